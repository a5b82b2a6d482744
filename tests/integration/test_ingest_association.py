"""Association policy: the simultaneous-association limit, and unsupported transfer syntaxes."""

from __future__ import annotations

from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from harness.dicom_peers import ECHOSCU
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.ingest.app import IngestService
from tests.support.ingest_service import AE_TITLE, call, ingest_settings, run


async def test_association_limit_and_unsupported_syntax(tmp_path: Path, rabbit: RabbitNode, broker: object) -> None:
    settings = ingest_settings(tmp_path, rabbit.url, max_associations=1)
    service = await IngestService(settings).start(http=False)
    try:
        port = service.dicom_port
        scu = AE(ae_title="HOLDER")
        scu.add_requested_context(Verification)
        # HTJ2K is not among our transfer syntaxes: that context must be rejected
        scu.add_requested_context(DigitalXRayImageStorageForPresentation, ["1.2.840.10008.1.2.4.201"])
        held = await call(scu.associate, "127.0.0.1", port, ae_title=AE_TITLE)
        try:
            assert held.is_established
            accepted = {cx.abstract_syntax for cx in held.accepted_contexts}
            assert accepted == {Verification}
            assert [cx.abstract_syntax for cx in held.rejected_contexts] == [DigitalXRayImageStorageForPresentation]
            # the one allowed association is in use: a second one is refused, the held one still works
            second = await run([ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", str(port)])
            assert second.returncode != 0
            assert (await call(held.send_c_echo)).Status == 0
        finally:
            await call(held.release)

        # released: a new association is accepted again (once the old association's thread has ended)
        async def echo_accepted() -> bool:
            return (await run([ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", str(port)])).returncode == 0

        await eventually_async(echo_accepted, 20, 0.25, what="an association accepted after the held one was released")
    finally:
        await service.stop()
