"""StackConfig with replicas: names, ports and broker nodes of every process, as `up --replicas`
and the multi-replica harness start them."""

from __future__ import annotations

from pathlib import Path

from harness.processes import SERVICES
from harness.stack import DICOM_PORT_ENV, HTTP_PORT_ENV, StackConfig

HTTP = {"ingest": 8001, "inference": 8002, "labeling": 8003, "aggregator": 8004}


def config(replicas: int, nodes: int = 3) -> StackConfig:
    return StackConfig(
        data_dir=Path("/tmp/x"),
        amqp_url="amqp://guest:guest@127.0.0.1:5672/",
        http_ports=dict(HTTP),
        dicom_port=11112,
        replicas=dict.fromkeys(SERVICES, replicas),
        replica_http_ports={svc: [port + 100 * k for k in range(1, replicas)] for svc, port in HTTP.items()},
        replica_dicom_ports=[11112 + k for k in range(1, replicas)],
        amqp_urls=[f"amqp://guest:guest@127.0.0.1:{5672 + n}/" for n in range(nodes)],
    )


def test_one_replica_is_the_plain_stack() -> None:
    plain = StackConfig(data_dir=Path("/tmp/x"), amqp_url="amqp://a/")
    assert [s.name for s in plain.specs()] == list(SERVICES)
    assert plain.dicom_ports == [plain.dicom_port]
    assert all(s.env["PT_AMQP_URL"] == "amqp://a/" for s in plain.specs())


def test_every_replica_has_its_own_ports_and_the_nodes_are_shared_out() -> None:
    cfg = config(replicas=3)
    specs = {s.name: s for s in cfg.specs()}
    assert set(specs) == {f"{svc}{suffix}" for svc in SERVICES for suffix in ("", "-2", "-3")}
    # HTTP ports all distinct, and each health URL is the port the process is told to use
    ports = [int(s.env[HTTP_PORT_ENV[name.split("-")[0]]]) for name, s in specs.items()]
    assert len(set(ports)) == len(ports)
    for name, s in specs.items():
        assert s.health_url == f"http://127.0.0.1:{s.env[HTTP_PORT_ENV[name.split('-')[0]]]}/healthz"
    # three ingest SCPs, one AE title, three DICOM ports
    assert cfg.dicom_ports == [11112, 11113, 11114]
    assert [specs[n].env[DICOM_PORT_ENV] for n in ("ingest", "ingest-2", "ingest-3")] == ["11112", "11113", "11114"]
    assert len({specs[n].env["PT_INGEST_AE_TITLE"] for n in ("ingest", "ingest-2", "ingest-3")}) == 1
    # the replicas of each service sit on different broker nodes
    for svc in SERVICES:
        assert len({specs[n].env["PT_AMQP_URL"] for n in cfg.replica_names(svc)}) == 3, svc
