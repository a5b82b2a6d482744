"""Start the tritonserver binary from the nvidia-pytriton wheel on loopback (CPU, python backend).

For tests, benchmarks and CPU-only installs; production runs the official Triton container.
Gotchas handled here (see ../shared/RUNTIME-NOTES.md and docs/inference.md):
- the python-backend stub must find this interpreter's libpython first (LD_LIBRARY_PATH), and the
  stub built for this Python version has to sit in the backend directory;
- the stub's pybind11 reads numpy's C structs with the NumPy 1 layout: under NumPy 2 every output
  tensor comes back EMPTY (right shape, zero bytes: "output tensor shape does not match size").
  So the stub runs in its own small venv (found through PATH) holding numpy<2, with a .pth file
  that appends this interpreter's site-packages (onnxruntime etc.); created once, cached;
- shutdown can take ~30 s, so stop() kills the process group.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from services.core.net import free_port

# Installed into the stub's own venv (not the project's): see the module docstring.
STUB_REQUIREMENTS: tuple[str, ...] = ("numpy==1.26.4",)


def pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed (pip install nvidia-pytriton): no tritonserver binary")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def tritonserver_binary() -> Path:
    return pytriton_dir() / "bin" / "tritonserver"


def stub_env_dir() -> Path:
    """Where the python-backend stub's venv lives (PT_TRITON_STUB_ENV, else a per-user cache)."""
    if os.environ.get("PT_TRITON_STUB_ENV"):
        return Path(os.environ["PT_TRITON_STUB_ENV"])
    key = hashlib.sha256("|".join((sys.prefix, *STUB_REQUIREMENTS)).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "pneumotriage" / f"triton-stub-py{sys.version_info[0]}{sys.version_info[1]}-{key}"


def ensure_stub_env(target: Path | None = None) -> Path:
    """Create (once) the venv the python-backend stub runs in: numpy<2 + this interpreter's packages."""
    target = target or stub_env_dir()
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(building)], check=True)
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(_site(building)),
            *STUB_REQUIREMENTS,
        ],
        check=True,
    )
    # Appended after the venv's own site-packages: its numpy wins, everything else comes from here.
    (_site(building) / "pneumotriage-main.pth").write_text("\n".join(site_dirs) + "\n")
    (building / ".complete").write_text("ok\n")
    try:
        building.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(building, ignore_errors=True)
    return target


def _site(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


class LocalTriton:
    """A tritonserver process on 127.0.0.1 with explicit model control over `model_repository`."""

    def __init__(
        self,
        model_repository: Path,
        *,
        load_models: tuple[str, ...] = (),
        work_dir: Path | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.model_repository = Path(model_repository)
        self.load_models = load_models
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="pt-triton-"))
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.work_dir / "tritonserver.log"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _backend_dir(self) -> Path:
        """A backend directory holding the python backend and the stub built for this Python."""
        backends = self.work_dir / "backends"
        python_backend = backends / "python"
        if not (python_backend / "triton_python_backend_stub").exists():
            src = pytriton_dir()
            shutil.copytree(src / "backends" / "python", python_backend, dirs_exist_ok=True)
            version = f"{sys.version_info[0]}.{sys.version_info[1]}"
            stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
            if not stub.exists():
                raise RuntimeError(f"no Triton python-backend stub for Python {version}")
            shutil.copy2(stub, python_backend / "triton_python_backend_stub")
        return backends

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = str(sysconfig.get_config_var("LIBDIR") or "")
        server_libs = str(pytriton_dir().parents[1] / "nvidia_pytriton.libs")
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, server_libs, env.get("LD_LIBRARY_PATH", "")) if p)
        # The stub finds its Python environment through PATH (PYTHONPATH is ignored).
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{ensure_stub_env() / 'bin'}:{env.get('PATH', '')}"
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def command(self) -> list[str]:
        cmd = [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self._backend_dir()}",
            f"--cache-directory={self.work_dir / 'caches'}",
            "--model-control-mode=explicit",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            "--exit-timeout-secs=5",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]
        cmd += [f"--load-model={name}" for name in self.load_models]
        return cmd

    def start(self, timeout: float = 90.0) -> LocalTriton:
        if self.process is not None and self.process.poll() is None:
            return self
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "caches").mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            env=self.env(),
            stdout=open(self.log_path, "ab"),  # owned by the child
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}): {self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9 the server (and its python-backend stubs): a crash, as far as clients can tell."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        """Stop quickly: Triton's graceful exit waits for in-flight work (up to ~30 s); we kill it."""
        self.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
