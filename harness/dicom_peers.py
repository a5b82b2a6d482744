"""Real DICOM peers for tests and benchmarks: an Orthanc PACS and dcmtk's storescp / storescu / echoscu.

Everything runs as a child process on free loopback ports with its own temporary directories, and is
stopped (and its directories removed) afterwards. dcmtk tools are always called by absolute path:
pynetdicom installs scripts with the same names into the venv.

Use in a test module:

    from harness.dicom_peers import orthanc_fixture, storescp_fixture  # noqa: F401  (fixtures
    # named "orthanc" and "storescp"; importing them under other names keeps ruff's F811 quiet)

    def test_forward(orthanc):
        orthanc.add_modality("pt", "PNEUMOTRIAGE", "127.0.0.1", port)
        ids = orthanc.upload(path)
        orthanc.store_to("pt", ids)
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from harness.processes import TestProcess
from harness.wait import eventually
from services.core.net import free_port

ORTHANC_BIN = "/usr/sbin/Orthanc"
STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
# dcmtk leaves Nagle's algorithm on unless this variable is set (its documented switch, read by its
# network layer, which Orthanc uses too): without it every small write waits for the peer's delayed
# ACK (~40 ms per C-STORE on loopback). Benchmarks run every dcmtk-based peer with it.
DCMTK_NODELAY_ENV: dict[str, str] = {"TCP_NODELAY": "1"}


def wait_for_port(host: str, port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until host:port accepts connections (fails at once when `process` exits first). For a
    process of a TestProcess, `TestProcess.wait_listening` says the same with its log tail."""

    def listening() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.create_connection((host, port), timeout=1):
            return True

    eventually(listening, timeout, what=f"something listening on {host}:{port}", ignore=(OSError,))


class Orthanc:
    """A throwaway Orthanc (Debian package) with its own storage, index and ports; REST on loopback only."""

    def __init__(
        self,
        aet: str = "ORTHANC",
        base_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="pt-orthanc-"))
        self.aet = aet
        self.env = dict(env or {})
        self.config_overrides = dict(config_overrides or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: TestProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.proc.process if self.proc is not None else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.base / "orthanc.log"

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"pt-test-{self.http_port}",
            "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [],
            "DicomModalities": {},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "SaveJobs": False,
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "DicomScuTimeout": 30,
            **self.config_overrides,
        }

    def start(self, timeout: float = 60.0) -> Orthanc:
        if not Path(ORTHANC_BIN).exists():
            raise RuntimeError("Orthanc is not installed (apt-get install -y orthanc)")
        self.base.mkdir(parents=True, exist_ok=True)
        cfg = self.base / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        self.proc = TestProcess("orthanc", [ORTHANC_BIN, str(cfg)], self.log_path, env=self.env).launch()
        eventually(lambda: self._check_started() and self.get("/system"), timeout, 0.2,
                   what=lambda: f"Orthanc's REST API: {self.proc.tail(2000) if self.proc else ''}",
                   ignore=(OSError, urllib.error.URLError))  # fmt: skip
        self.proc.wait_listening(self.dicom_port, timeout)
        return self

    def _check_started(self) -> bool:
        assert self.proc is not None
        if not self.proc.alive():
            raise RuntimeError(f"Orthanc exited: {self.proc.tail(2000)}")
        return True

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)

    # --- REST -----------------------------------------------------------------------------------
    def request(
        self, method: str, path: str, body: bytes | str | dict[str, Any] | list[Any] | None = None, timeout: float = 120
    ) -> Any:
        data: bytes | None
        headers = {}
        if isinstance(body, dict | list):
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        if data is not None and "Content-Type" not in headers:
            headers["Content-Type"] = "application/octet-stream"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer (PUT /modalities/<name>) that Orthanc can C-ECHO / C-STORE to."""
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def upload(self, path: Path | str) -> dict[str, Any]:
        """POST one DICOM file to /instances; returns Orthanc's answer (ID, ParentStudy, Status...)."""
        return dict(self.request("POST", "/instances", Path(path).read_bytes()))

    def echo(self, modality: str) -> bool:
        try:
            self.request("POST", f"/modalities/{modality}/echo", {})
            return True
        except urllib.error.HTTPError:
            return False

    def store_to(self, modality: str, resources: str | Iterable[str], timeout: float = 300) -> dict[str, Any]:
        """C-STORE instances/series/studies (Orthanc ids) to a declared modality, synchronously."""
        ids = [resources] if isinstance(resources, str) else list(resources)
        body = {"Resources": ids, "Synchronous": True, "Timeout": int(timeout)}
        return dict(self.request("POST", f"/modalities/{modality}/store", body, timeout=timeout + 30) or {})

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StoreSCP:
    """dcmtk's storescp writing every received instance to its own directory (accepts all syntaxes)."""

    def __init__(
        self,
        aet: str = "STORESCP",
        base_dir: Path | None = None,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="pt-storescp-"))
        self.aet = aet
        self.env = dict(env or {})
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.proc: TestProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.proc.process if self.proc is not None else None

    @property
    def out_dir(self) -> Path:
        return self.base / "received"

    def start(self, timeout: float = 30.0) -> StoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [STORESCP, "-aet", self.aet, "+xa", "-od", str(self.out_dir), *self.extra_args, str(self.port)]
        self.proc = TestProcess("storescp", cmd, self.base / "storescp.log", env=self.env).launch()
        self.proc.wait_listening(self.port, timeout)
        return self

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=20)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# dcmtk storescu proposes only uncompressed syntaxes unless told; the flag that proposes each one.
STORESCU_SYNTAX_FLAGS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2": (),  # implicit VR little endian
    "1.2.840.10008.1.2.1": (),  # explicit VR little endian
    "1.2.840.10008.1.2.1.99": ("-xd",),  # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.50": ("-xy",),  # JPEG baseline (8 bit)
    "1.2.840.10008.1.2.4.51": ("-xx",),  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.70": ("-xs",),  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": ("-xt",),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ("-xu",),  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": ("-xv",),  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ("-xw",),  # JPEG 2000
    "1.2.840.10008.1.2.5": ("-xr",),  # RLE lossless
}


def storescu_flags_for(path: Path | str) -> tuple[str, ...]:
    """storescu options proposing the file's own transfer syntax (KeyError when storescu has none)."""
    import pydicom

    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return STORESCU_SYNTAX_FLAGS[ts]


def echoscu(port: int, called_ae: str, calling_ae: str = "ECHOSCU", host: str = "127.0.0.1", timeout: float = 60):
    """Run dcmtk's echoscu; returns the CompletedProcess (returncode 0 = C-ECHO succeeded)."""
    return subprocess.run(
        [ECHOSCU, "-aet", calling_ae, "-aec", called_ae, "-to", "20", host, str(port)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def storescu(
    port: int,
    files: Iterable[Path | str],
    called_ae: str,
    calling_ae: str = "STORESCU",
    host: str = "127.0.0.1",
    extra_args: Iterable[str] = ("-R",),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run dcmtk's storescu (by default -R: propose each file's own transfer syntax only).

    storescu exits non-zero when an association fails; per-file refusals show in its log output
    (use `-v` in extra_args for the per-file status lines).
    """
    cmd = [STORESCU, "-aet", calling_ae, "-aec", called_ae, "-to", "30", *extra_args, host, str(port)]
    cmd += [str(f) for f in files]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(name="orthanc")
def orthanc_fixture() -> Iterator[Orthanc]:
    """A real Orthanc PACS, fresh for each test, on free loopback ports."""
    peer = Orthanc().start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(name="storescp")
def storescp_fixture() -> Iterator[StoreSCP]:
    """dcmtk storescp on a free port, writing into its own temporary directory."""
    peer = StoreSCP().start()
    try:
        yield peer
    finally:
        peer.stop()


# the fixtures under their own names too, for `from harness.dicom_peers import orthanc`
orthanc = orthanc_fixture
storescp = storescp_fixture
