"""The `up` supervisor on real child processes: health wait, restart with back-off after kill -9,
orderly stop."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harness.processes import ChildProcess, ServiceSpec
from harness.supervisor import RestartPolicy, Supervisor
from services.core.net import free_port


def http_child(name: str, tmp_path: Path) -> ChildProcess:
    port = free_port()
    spec = ServiceSpec(
        name=name,
        argv=[sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health_url=f"http://127.0.0.1:{port}/",
        cwd=tmp_path,
    )
    return ChildProcess(spec, tmp_path / "logs" / f"{name}.log")


def test_restart_after_kill9_with_backoff(tmp_path: Path) -> None:
    children = [http_child("a", tmp_path), http_child("b", tmp_path)]
    messages: list[str] = []
    sup = Supervisor(children, RestartPolicy(initial_backoff_s=2.0, max_backoff_s=8.0), notify=messages.append)
    try:
        sup.start_all(wait_healthy=True, timeout=60)
        a, b = children
        first_pid = a.pid
        a.kill9()
        assert not a.alive()
        t0 = time.monotonic()
        sup.poll_once(now=t0)  # schedules the restart, does not start yet
        assert not a.alive() and sup.restarts["a"] == 0
        sup.poll_once(now=t0 + 1.0)  # still within the 2 s back-off
        assert not a.alive()
        sup.poll_once(now=t0 + 2.1)
        assert a.alive() and a.pid != first_pid and sup.restarts["a"] == 1
        a.wait_healthy(60)
        # a second crash waits twice as long
        a.kill9()
        t1 = time.monotonic()
        sup.poll_once(now=t1)
        sup.poll_once(now=t1 + 3.0)
        assert not a.alive()
        sup.poll_once(now=t1 + 4.1)
        assert a.alive() and sup.restarts["a"] == 2
        assert b.alive() and sup.restarts["b"] == 0
        assert any("restarting in 4s" in m for m in messages)
    finally:
        sup.stop_all(timeout_per_child=10)
    assert all(not c.alive() for c in children)
    # stopped in reverse order: b first
    stops = [m for m in messages if m.startswith("stopping")]
    assert stops == ["stopping b", "stopping a"]


def test_child_that_dies_at_start_reports_its_log(tmp_path: Path) -> None:
    spec = ServiceSpec(
        name="broken",
        argv=[sys.executable, "-c", "import sys; print('boom: bad config'); sys.exit(3)"],
        health_url=f"http://127.0.0.1:{free_port()}/healthz",
    )
    child = ChildProcess(spec, tmp_path / "broken.log")
    child.start()
    try:
        child.wait_healthy(30)
    except RuntimeError as exc:
        assert "exited with 3" in str(exc) and "boom: bad config" in str(exc)
    else:
        raise AssertionError("a dead child must not be reported healthy")


def test_rss_is_sampled_from_proc(tmp_path: Path) -> None:
    child = http_child("m", tmp_path)
    child.start()
    try:
        child.wait_healthy(60)
        rss = child.rss_bytes()
        assert rss is not None and 5_000_000 < rss < 500_000_000
    finally:
        child.terminate(10)
    assert child.rss_bytes() is None


def test_rabbit_data_dir_must_be_reachable_by_the_rabbitmq_user(tmp_path: Path) -> None:
    """As root, a data dir under a 0700 directory (e.g. a checkout in /root) is unreachable for
    Debian's rabbitmq-server, which drops to user rabbitmq: `up` then keeps broker data elsewhere."""
    import os
    import pwd

    from harness.cli import _rabbit_dir

    if os.geteuid() != 0:
        assert _rabbit_dir(tmp_path / "rabbitmq", "t") == tmp_path / "rabbitmq"
        return
    pwd.getpwnam("rabbitmq")  # KeyError: rabbitmq-server (a test peer ./pt test installs) is missing
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    assert _rabbit_dir(private / "var" / "rabbitmq", "abc") == Path("/var/lib/rabbitmq/pneumotriage-abc")
    public = Path("/tmp") / f"pt-public-{os.getpid()}"
    public.mkdir(mode=0o755, exist_ok=True)
    try:
        os.chmod(public, 0o755)
        assert _rabbit_dir(public / "var" / "rabbitmq", "abc") == public / "var" / "rabbitmq"
    finally:
        public.rmdir()


def test_up_keeps_one_session_secret_across_restarts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import stat

    from harness.cli import _persistent_secret

    first = _persistent_secret(tmp_path / "secret_key")
    assert len(first) == 64
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600
    assert _persistent_secret(tmp_path / "secret_key") == first
