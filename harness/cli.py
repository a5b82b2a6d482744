"""`./pt up` (run the whole system on this machine) and `./pt demo` (seed it): `python -m harness up|demo`
from a checkout; the services themselves are reached only through their `pneumotriage` commands and APIs."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.panel import Panel

app = typer.Typer()
console = Console()


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _persistent_secret(path: Path) -> str:
    """Read the secret in `path`, creating it (random, mode 0600) the first time."""
    import secrets

    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def _http_ports_from_env() -> dict[str, int]:
    from harness.processes import DEFAULT_HTTP_PORTS
    from harness.stack import HTTP_PORT_ENV

    return {svc: int(os.environ.get(HTTP_PORT_ENV[svc], port)) for svc, port in DEFAULT_HTTP_PORTS.items()}


@app.command("up")
def up(
    logs: bool = typer.Option(False, "--logs", help="Echo every service's log lines here (always in <data_dir>/logs)."),
    management: bool = typer.Option(True, help="Enable RabbitMQ's management UI on the local node."),
    replicas: int = typer.Option(
        1, min=1, max=8, help="Processes per service (needs PostgreSQL: --cluster or PT_DATABASE_URL)."
    ),
    cluster: bool = typer.Option(
        False,
        "--cluster",
        help="Rehearse the production topology: a throwaway 3-node RabbitMQ cluster (quorum queues) and "
        "PostgreSQL server on this machine, instead of one node and SQLite.",
    ),
) -> None:
    """Run RabbitMQ (unless PT_AMQP_URL is set) and the four services; Ctrl-C stops everything."""
    from honcho.colour import get_colours
    from honcho.printer import Message, Printer

    from harness.config import SystemSettings
    from harness.processes import ChildProcess
    from harness.rabbitmq import RabbitNode
    from harness.stack import AE_TITLE_ENV, DEFAULT_AE_TITLE, DEFAULT_DICOM_PORT, DICOM_PORT_ENV, StackConfig
    from harness.supervisor import RestartPolicy, Supervisor
    from services.core.net import free_port

    settings = SystemSettings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    http_ports = _http_ports_from_env()
    dicom_port = int(os.environ.get(DICOM_PORT_ENV, DEFAULT_DICOM_PORT))
    for what, port in [*http_ports.items(), ("ingest DICOM", dicom_port)]:
        if not _port_free(port, settings.http_host):
            console.print(
                f"[red]port {port} ({what}) is in use[/red]: stop what holds it or set its PT_*_PORT variable"
            )
            raise typer.Exit(2)

    if replicas > 1 and not (cluster or settings.database_url):
        console.print("[red]--replicas > 1 needs PostgreSQL[/red]: add --cluster, or set PT_DATABASE_URL")
        raise typer.Exit(2)
    node: RabbitNode | None = None
    amqp_url = settings.amqp_url
    mgmt_url = ""
    stop = threading.Event()
    scale_out = _ScaleOut(replicas, http_ports, dicom_port)
    for what, port in scale_out.extra_ports():
        if not _port_free(port, settings.http_host):
            console.print(f"[red]port {port} ({what}) is in use[/red]")
            raise typer.Exit(2)

    def on_signal(signum: int, _frame: object) -> None:
        if not stop.is_set():
            console.print(f"\n[yellow]{signal.Signals(signum).name}: stopping[/yellow] (services first, then RabbitMQ)")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if cluster:
        try:
            scale_out.start_backends(settings, stop)
        except Exception as exc:
            console.print(f"[red]cluster start-up failed:[/red] {exc}")
            scale_out.stop_backends()
            raise typer.Exit(1) from exc
        amqp_url = scale_out.amqp_url or amqp_url
    elif not settings.amqp_url_given():
        amqp_port = settings.system_amqp_port if _port_free(settings.system_amqp_port) else free_port()
        mgmt_port = None
        if management and settings.system_management_port:
            mgmt_port = settings.system_management_port if _port_free(settings.system_management_port) else free_port()
        tag = hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]
        node = RabbitNode(
            base_dir=_rabbit_dir(settings.system_rabbit_dir or data_dir / "rabbitmq", tag),
            port=amqp_port,
            management_port=mgmt_port,
            nodename=f"pneumotriage-{tag}@localhost",
            keep_data=True,
        )
        with console.status(f"starting RabbitMQ on 127.0.0.1:{amqp_port} (data in {node.base}) ..."):
            node.start(timeout=120)
        amqp_url = node.url
        mgmt_url = f"http://127.0.0.1:{mgmt_port}/ (guest/guest)" if mgmt_port else ""
        console.print(f"[green]RabbitMQ ready[/green] at {amqp_url}")

    # One session-signing key for the web services, kept across restarts (a crashed and restarted
    # service must not sign everybody out): PT_SECRET_KEY when given, else <data_dir>/secret_key.
    os.environ.setdefault("PT_SECRET_KEY", _persistent_secret(data_dir / "secret_key"))

    config = StackConfig(
        data_dir=data_dir,
        amqp_url=amqp_url,
        host=settings.http_host,
        http_ports=http_ports,
        dicom_port=dicom_port,
        ae_title=os.environ.get(AE_TITLE_ENV, DEFAULT_AE_TITLE),
        **scale_out.stack_fields(),
    )
    names = [spec.name for spec in config.specs()]
    printer = Printer(console.file)
    printer.width = max(len(n) for n in names) + 1
    colours = dict(zip(names, get_colours(), strict=False))

    def sink(name: str, line: str) -> None:
        import datetime

        printer.write(
            Message(type="line", data=line + "\n", time=datetime.datetime.now(), name=name, colour=colours[name])
        )

    children = [
        ChildProcess(spec, data_dir / "logs" / f"{spec.name}.log", sink=sink if logs else None)
        for spec in config.specs()
    ]
    supervisor = Supervisor(
        children,
        RestartPolicy(settings.system_restart_backoff_s, settings.system_restart_backoff_max_s),
        notify=lambda msg: console.print(f"[dim]supervisor:[/dim] {msg}"),
    )
    code = 0
    try:
        for child in children:
            child.start()
            console.print(f"[dim]supervisor:[/dim] started {child.name} (pid {child.pid}, log {child.log_path})")
        for child in children:
            while not stop.is_set():
                try:
                    child.wait_healthy(timeout=2.0)
                    break
                except TimeoutError:
                    if _deadline_passed(child, settings.system_health_timeout_s):
                        raise
            if stop.is_set():
                break
        if not stop.is_set():
            console.print(_banner(config, mgmt_url, data_dir))
            supervisor.run_until(stop)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]start-up failed:[/red] {exc}")
        code = 1
    finally:
        supervisor.stop_all()
        if node is not None:
            with console.status("stopping RabbitMQ ..."):
                node.stop()
        if cluster:
            with console.status("stopping the RabbitMQ cluster and PostgreSQL ..."):
                scale_out.stop_backends()
        console.print("stopped." if code == 0 else "stopped after a failure.")
    raise typer.Exit(code)


class _ScaleOut:
    """What `up --replicas N --cluster` adds: replica ports (replica k of a service listens on its
    HTTP port + 100·(k-1); ingest replica k on the DICOM port + (k-1), same AE title), and the
    throwaway 3-node RabbitMQ cluster + PostgreSQL server (data in temp dirs, removed on exit)."""

    def __init__(self, replicas: int, http_ports: dict[str, int], dicom_port: int) -> None:
        self.replicas = replicas
        self.http_ports = http_ports
        self.dicom_port = dicom_port
        self.cluster: object | None = None
        self.postgres: object | None = None
        self.amqp_url = ""
        self.amqp_urls: list[str] = []
        self.env: dict[str, str] = {}

    def replica_http_ports(self) -> dict[str, list[int]]:
        return {svc: [port + 100 * k for k in range(1, self.replicas)] for svc, port in self.http_ports.items()}

    def replica_dicom_ports(self) -> list[int]:
        return [self.dicom_port + k for k in range(1, self.replicas)]

    def extra_ports(self) -> list[tuple[str, int]]:
        out = [(f"{svc}-{k + 2}", p) for svc, ports in self.replica_http_ports().items() for k, p in enumerate(ports)]
        return out + [(f"ingest-{k + 2} DICOM", p) for k, p in enumerate(self.replica_dicom_ports())]

    def start_backends(self, settings: object, stop: threading.Event) -> None:
        from harness.postgres import PostgresServer
        from harness.rabbit_cluster import RabbitCluster

        if not getattr(settings, "database_url", None):
            with console.status("starting PostgreSQL (initdb + pg_ctl) ..."):
                self.postgres = PostgresServer().start()
            self.env["PT_DATABASE_URL"] = self.postgres.url  # type: ignore[attr-defined]
            console.print(f"[green]PostgreSQL ready[/green] at {self.postgres.dsn}")  # type: ignore[attr-defined]
        if not settings.amqp_url_given():  # type: ignore[attr-defined]
            with console.status("starting a 3-node RabbitMQ cluster ..."):
                self.cluster = RabbitCluster(3).start()
            self.amqp_urls = list(self.cluster.urls)  # type: ignore[attr-defined]
            self.amqp_url = self.amqp_urls[0]
            console.print(f"[green]RabbitMQ cluster ready[/green]: {', '.join(self.amqp_urls)}")
        self.env["PT_QUORUM_QUEUES"] = "true"

    def stack_fields(self) -> dict[str, object]:
        replicas = dict.fromkeys(self.http_ports, self.replicas)
        return {
            "replicas": replicas,
            "replica_http_ports": self.replica_http_ports(),
            "replica_dicom_ports": self.replica_dicom_ports(),
            "amqp_urls": self.amqp_urls,
            "env": dict(self.env),
        }

    def stop_backends(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()  # type: ignore[attr-defined]
            self.cluster = None
        if self.postgres is not None:
            self.postgres.stop()  # type: ignore[attr-defined]
            self.postgres = None


def _rabbit_dir(wanted: Path, tag: str) -> Path:
    """Debian's rabbitmq-server runs as user rabbitmq: as root, its data dir must be reachable by
    that user (a checkout under /root, mode 700, is not); else use /var/lib/rabbitmq/pneumotriage-<tag>."""
    import pwd

    if os.geteuid() != 0:
        return wanted
    try:
        rabbit_uid = pwd.getpwnam("rabbitmq").pw_uid
    except KeyError:
        return wanted
    for parent in wanted.resolve().parents:
        if parent.exists():
            st = parent.stat()
            if not (st.st_mode & 0o001 or (st.st_uid == rabbit_uid and st.st_mode & 0o100)):
                fallback = Path("/var/lib/rabbitmq") / f"pneumotriage-{tag}"
                console.print(f"[dim]{parent} is not reachable by user rabbitmq: broker data in {fallback}[/dim]")
                return fallback
    return wanted


def _deadline_passed(child: object, timeout: float) -> bool:
    import time

    return time.monotonic() - child.started_at > timeout  # type: ignore[attr-defined]


def _cli_name() -> str:
    """How to call `pneumotriage` from this shell: plain when on PATH, else the venv's script."""
    import shutil
    import sys

    script = Path(sys.executable).parent / "pneumotriage"
    on_path = shutil.which("pneumotriage")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "pneumotriage"
    if script.exists():
        try:
            return str(script.relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return "pneumotriage"


def _banner(config: object, mgmt_url: str, data_dir: Path) -> Panel:
    from harness.stack import StackConfig

    assert isinstance(config, StackConfig)
    lines = [
        "[bold green]PneumoTriage is up[/bold green] — a diagnostic aid, not a diagnosis.",
        "",
        f"  DICOM (C-STORE / C-ECHO)  AE [bold]{config.ae_title}[/bold] at {config.host}:"
        + ", ".join(str(p) for p in config.dicom_ports),
        f"  clinician worklist        {config.url('aggregator', '/')}",
        f"  labeling (annotators)     {config.url('labeling', '/')}",
        f"  ingest / inference ops    {config.url('ingest', '/healthz')}  {config.url('inference', '/healthz')}",
        "  metrics                   every service's /metrics",
    ]
    extra = [name for svc in config.services for name in config.replica_names(svc)[1:]]
    if extra:
        lines.append(f"  replicas                  {', '.join(f'{n} {config.replica_url(n)}' for n in extra)}")
    if config.amqp_urls:
        lines.append(f"  RabbitMQ cluster          {', '.join(config.amqp_urls)} (quorum queues)")
    if mgmt_url:
        lines.append(f"  RabbitMQ management       {mgmt_url}")
    cli = _cli_name()
    lines += [
        f"  data, logs                {data_dir}  ({data_dir / 'logs'})",
        "",
        "  First study:  [bold]./pt demo[/bold]   (accounts + a handful of real X-rays), or",
        f"                {cli} send ../shared/data/dicom/ --port {config.dicom_port}",
        "  Stop:         Ctrl-C",
    ]
    return Panel("\n".join(lines), expand=False)


def _run_cli(args: list[str], what: str) -> str:
    """Run another service's `pneumotriage` command (services are reached only through their CLI/APIs)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        console.print(f"[red]{what} failed[/red] (pneumotriage {' '.join(args[:2])} ...):\n{res.stderr[-2000:]}")
        raise typer.Exit(1)
    return res.stdout


def _flags_set(url: str) -> float:
    """Sum of pt_aggregator_flags_total on the aggregator's /metrics (no sign-in needed)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "pt_aggregator_flags":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


@app.command("demo")
def demo(
    data: Path = typer.Option(
        Path("../shared/data"), help="the shared data folder (kermany224/train/{NORMAL,PNEUMONIA})"
    ),
    n: int = typer.Option(8, min=1, max=200, help="X-rays to send"),
    gold: int = typer.Option(48, min=2, help="gold items for the labeling job (4 examples, 16 quiz, rest hidden)"),
    host: str = typer.Option("127.0.0.1", help="where `./pt up` runs"),
    wait: float = typer.Option(90.0, help="seconds to wait for the first flags (0: do not wait)"),
) -> None:
    """Against a running system: create demo accounts, import gold, send a handful of real X-rays."""
    import random
    import secrets
    import time

    import httpx
    from rich.table import Table

    from harness.stack import DEFAULT_DICOM_PORT, DICOM_PORT_ENV

    ports = _http_ports_from_env()
    dicom_port = int(os.environ.get(DICOM_PORT_ENV, DEFAULT_DICOM_PORT))
    for svc, port in ports.items():
        try:
            ok = httpx.get(f"http://{host}:{port}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            ok = False
        if not ok:
            console.print(f"[red]{svc} is not answering on {host}:{port}[/red]: start the system with `./pt up` first")
            raise typer.Exit(2)

    accounts = [
        ("labeling", "demo-annotator", "annotator", "annotate images", ports["labeling"]),
        ("labeling", "demo-owner", "owner", "job owner pages", ports["labeling"]),
        ("aggregator", "demo-clinician", "clinician", "worklist", ports["aggregator"]),
    ]
    table = Table("who", "user", "password", "sign in at")
    with console.status("creating demo accounts ..."):
        for service, name, role, what, port in accounts:
            password = secrets.token_urlsafe(9)
            _run_cli([service, "add-user", name, "--role", role, "--password", password], f"{role} account")
            table.add_row(what, name, password, f"http://{host}:{port}/")

    train = data / "kermany224" / "train"
    if not train.is_dir():
        console.print(table)
        console.print(f"[yellow]{train} not found[/yellow]: accounts are ready; send your own studies with "
                      f"`pneumotriage send PATH --port {dicom_port}`")  # fmt: skip
        return
    with console.status(f"importing {gold} gold items into the labeling job ..."):
        _run_cli(["labeling", "import-gold", "--data", str(train), "--n", str(gold)], "gold import")

    rng = random.Random()
    picks = rng.sample(sorted((train / "PNEUMONIA").glob("*.jpeg")), max(1, n - n // 3))
    picks += rng.sample(sorted((train / "NORMAL").glob("*.jpeg")), n // 3)
    from harness.config import SystemSettings

    out = SystemSettings().data_dir.resolve() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    with console.status(f"wrapping {len(picks)} X-rays as DICOM ..."):
        _run_cli(
            ["make-dicom", *map(str, picks), "--out", str(out), "--transfer-syntax", "jpeg-baseline", "--view", "AP",
             "--uid-salt", secrets.token_hex(4)],
            "make-dicom",
        )  # fmt: skip
    metrics_url = f"http://{host}:{ports['aggregator']}/metrics"
    before = _flags_set(metrics_url)
    with console.status(f"sending {len(picks)} studies to {host}:{dicom_port} ..."):
        _run_cli(["send", str(out), "--host", host, "--port", str(dicom_port)], "send")
    console.print(f"[green]sent {len(picks)} real chest X-rays[/green] (DICOM in {out})")
    if wait > 0:
        deadline = time.monotonic() + wait
        with console.status("waiting for the first triage flags ..."):
            while time.monotonic() < deadline and _flags_set(metrics_url) - before < len(picks):
                time.sleep(1.0)
        console.print(f"flags set so far: {int(_flags_set(metrics_url) - before)} of {len(picks)} studies")
    console.print(table)
    console.print(
        f"Worklist: http://{host}:{ports['aggregator']}/ (sign in as demo-clinician). Annotators: "
        f"http://{host}:{ports['labeling']}/ — their votes refine the flags; a simulated crowd: "
        f"pneumotriage labeling simulate-crowd --url http://{host}:{ports['labeling']} --truth {train} "
        "--owner demo-owner --owner-password ..."
    )
