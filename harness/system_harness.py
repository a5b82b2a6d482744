"""The whole system for tests and benchmarks: the four services as real processes with their own
data dir, free ports and their own RabbitMQ vhost on a (shared) real RabbitMQ node, plus dcmtk's
storescu as the sending modality.

    with SystemHarness(rabbit, tmp_path) as system:
        sent = system.send(files, associations=2)
        system.wait_for(lambda: ...)
        system.kill9("inference"); system.restart("inference")

Reusable by the end-to-end, fault and soak tests and by bench/e2e.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom

from harness.processes import SERVICES, ChildProcess
from harness.rabbit_cluster import RabbitCluster
from harness.rabbitmq import RabbitNode
from harness.stack import StackConfig
from harness.wait import eventually
from services.core.net import free_port

STORESCU = "/usr/bin/storescu"
_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")
_FAILED = re.compile(r"Store Failed, file: (.+?):?$")


@dataclass
class SendResult:
    acked: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (file, status or error)
    returncodes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: SendResult) -> None:
        self.acked += other.acked
        self.refused += other.refused
        self.returncodes += other.returncodes


def parse_storescu_log(text: str) -> SendResult:
    """Per-file outcome from `storescu -v` output: Success/Warning = acknowledged (stored)."""
    result = SendResult()
    current: Path | None = None
    for line in text.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            status = m.group(1)
            if status.startswith(("Success", "Warning")):
                result.acked.append(current)
            else:
                result.refused.append((current, status))
            current = None
        elif (m := _FAILED.search(line)) and current is not None:
            result.refused.append((current, line.strip()))
            current = None
    if current is not None:  # association dropped before a response: not acknowledged
        result.refused.append((current, "no response"))
    return result


def chunk_by_study(files: list[Path], associations: int) -> list[list[Path]]:
    studies: dict[str, list[Path]] = {}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
        studies.setdefault(uid, []).append(f)
    chunks: list[list[Path]] = [[] for _ in range(max(1, associations))]
    for i, group in enumerate(studies.values()):
        chunks[i % len(chunks)].extend(group)
    return [c for c in chunks if c]


class SystemHarness:
    def __init__(
        self,
        rabbit: RabbitNode | RabbitCluster,
        base_dir: Path,
        services: tuple[str, ...] = SERVICES,
        env: dict[str, str] | None = None,
        service_env: dict[str, dict[str, str]] | None = None,
        replicas: dict[str, int] | None = None,
    ) -> None:
        """`rabbit` is one node or a RabbitCluster (replicas then spread over its nodes);
        `replicas` runs several processes of a service (names "<service>-2", ...)."""
        self.rabbit = rabbit
        self.base_dir = Path(base_dir)
        self.vhost = f"pt-sys-{uuid.uuid4().hex[:8]}"
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{rabbit.port}/{self.vhost}"
        replicas = {svc: n for svc, n in (replicas or {}).items() if n > 1}
        cluster_ports = rabbit.ports if isinstance(rabbit, RabbitCluster) else []
        self.config = StackConfig(
            data_dir=self.base_dir / "var",
            amqp_url=self.amqp_url,
            http_ports={svc: free_port() for svc in SERVICES},
            dicom_port=free_port(),
            env={"PT_LOG_JSON": "true", "PT_LOG_LEVEL": "INFO", "PT_SECRET_KEY": secrets.token_hex(32), **(env or {})},
            service_env=service_env or {},
            services=services,
            replicas=replicas,
            replica_http_ports={svc: [free_port() for _ in range(n - 1)] for svc, n in replicas.items()},
            replica_dicom_ports=[free_port() for _ in range(replicas.get("ingest", 1) - 1)],
            amqp_urls=[f"amqp://guest:guest@127.0.0.1:{p}/{self.vhost}" for p in cluster_ports],
        )
        self.children: dict[str, ChildProcess] = {
            spec.name: ChildProcess(spec, self.base_dir / "logs" / f"{spec.name}.log") for spec in self.config.specs()
        }

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> SystemHarness:
        self.rabbit.ctl("add_vhost", self.vhost)
        self.rabbit.ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        for child in self.children.values():
            child.start()
        try:
            for child in self.children.values():
                child.wait_healthy(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self, timeout_per_service: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every service at once (each drains in parallel), SIGKILL what is left after the timeout."""
        with ThreadPoolExecutor(len(self.children)) as pool:
            futures = {name: pool.submit(child.terminate, timeout_per_service) for name, child in self.children.items()}
            codes = {name: f.result() for name, f in futures.items()}
        with contextlib.suppress(Exception):
            self.rabbit.ctl("delete_vhost", self.vhost, check=False)
        return codes

    def __enter__(self) -> SystemHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill9(self, service: str) -> None:
        self.children[service].kill9()

    def restart(self, service: str, timeout: float = 180.0) -> None:
        child = self.children[service]
        if child.alive():
            child.terminate()
        child.start()
        child.wait_healthy(timeout)

    # -- addresses ----------------------------------------------------------------------------
    def url(self, service: str, path: str = "") -> str:
        return self.config.url(service, path)

    @property
    def dicom_port(self) -> int:
        return self.config.dicom_port

    @property
    def dicom_ports(self) -> list[int]:
        """Every ingest replica's DICOM port."""
        return self.config.dicom_ports

    def replicas_of(self, service: str) -> list[str]:
        """Names of the service's processes ("inference", "inference-2", ...)."""
        return self.config.replica_names(service)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def env(self) -> dict[str, str]:
        """Environment for running a `pneumotriage ...` command against this system."""
        return {**os.environ, **self.config.common_env()}

    def cli(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `pneumotriage ARGS` with this system's environment (accounts, gold import, crowd)."""
        res = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"pneumotriage {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res

    # -- sending ------------------------------------------------------------------------------
    def send(self, files: Iterable[Path], associations: int = 1, timeout: float = 600.0) -> SendResult:
        """C-STORE files with dcmtk's storescu over `associations` concurrent associations.

        Like a modality or PACS, a study's images travel on one association (studies are dealt
        round-robin to the associations). With several ingest replicas the associations are dealt
        round-robin to their DICOM ports (one AE title), as a TCP load balancer would.
        """
        chunks = chunk_by_study([Path(f) for f in files], associations)
        ports = self.dicom_ports
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [STORESCU, "-v", "-xy", "-aet", "SYSTEST", "-aec", self.config.ae_title, "-to", "60", "-ta", "60",
                 "-td", "120", "127.0.0.1", str(ports[i % len(ports)]), *map(str, chunk)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "TCP_NODELAY": "1"},  # dcmtk's documented switch: no Nagle stalls
            )
            for i, chunk in enumerate(chunks)
        ]  # fmt: skip
        result = SendResult()
        deadline = time.monotonic() + timeout
        for proc, chunk in zip(procs, chunks, strict=True):
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            part = parse_storescu_log(out)
            part.returncodes.append(proc.returncode)
            seen = set(part.acked) | {f for f, _ in part.refused}
            part.refused += [(f, f"not sent (storescu exit {proc.returncode})") for f in chunk if f not in seen]
            result.merge(part)
        result.seconds = time.monotonic() - started
        return result

    # -- observing ----------------------------------------------------------------------------
    def get_json(self, service: str, path: str, auth: tuple[str, str] | None = None, **params: Any) -> Any:
        r = httpx.get(self.url(service, path), params=params or None, auth=auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def metrics_text(self, service: str) -> str:
        return httpx.get(self.url(service, "/metrics"), timeout=30).text

    def metrics_text_of(self, name: str) -> str:
        """/metrics of one process by its replica name ("inference-2")."""
        return httpx.get(self.config.replica_url(name, "/metrics"), timeout=30).text

    def queue_depths(self) -> dict[str, int]:
        return self.rabbit.queue_depths(self.vhost)

    def rss(self) -> dict[str, int | None]:
        return {name: child.rss_bytes() for name, child in self.children.items()}

    def log_text(self, service: str) -> str:
        return self.children[service].log_path.read_text(errors="replace")

    def log_lines_with(self, needle: str) -> dict[str, int]:
        return {name: self.log_text(name).count(needle) for name in self.children}

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 120.0, interval: float = 1.0, what: str = "") -> Any:
        """harness.wait.eventually, polling once a second by default (the system is slow to change)."""
        return eventually(predicate, timeout, interval, what=what or str(predicate))
