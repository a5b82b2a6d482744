"""A banner on the clinician worklist while SR delivery is degraded (issue 23, item 2): results are
not reaching the PACS (the destination's breaker open with SRs waiting, or the oldest SR past
PT_AGGREGATOR_SR_HEALTH_MAX_AGE_S), with how many wait, for how long and why; gone once the PACS
(a real Orthanc) has them. Before: the worklist said nothing while /healthz said degraded."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from services.aggregator.service import Aggregator
from services.aggregator.sr import Destination
from tests.integration.test_aggregator_outputs import flag_a_study, shared_dicom, signed_in_client
from tests.support.aggregator_service import offline_aggregator_fixture  # noqa: F401

BANNER = 'id="sr-delivery-banner"'


@pytest.mark.parametrize(
    "offline_aggregator", [{"sr_destination": "127.0.0.1:9:NOBODY", "sr_settle_s": 0}], indirect=True
)
async def test_worklist_banner_while_results_do_not_reach_the_pacs(
    offline_aggregator: Aggregator, orthanc: Orthanc, shared_data: Path
) -> None:
    agg = offline_aggregator
    client = await signed_in_client(agg)
    try:
        page = await client.get("/worklist")
        assert page.status_code == 200 and BANNER not in page.text  # nothing waiting: no banner
        dcm, _ = shared_dicom(shared_data, "PNEUMONIA")
        await flag_a_study(agg, dcm)
        assert await agg.send_pending_srs() == 0  # nobody listens there: connect refused, breaker open
        page = await client.get("/worklist")
        assert page.status_code == 200 and BANNER in page.text
        banner = page.text.split(BANNER, 1)[1].split("</div>", 1)[0]
        assert "not reaching the PACS" in banner and "1 SR waiting" in banner
        assert "NOBODY@127.0.0.1:9" in banner and "connect" in banner

        agg.destination = Destination("127.0.0.1", orthanc.dicom_port, orthanc.aet)  # the PACS is back
        assert await agg.send_pending_srs() == 1
        page = await client.get("/worklist")
        assert page.status_code == 200 and BANNER not in page.text
    finally:
        await client.aclose()


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_no_banner_without_an_sr_destination(offline_aggregator: Aggregator, shared_data: Path) -> None:
    client = await signed_in_client(offline_aggregator)
    try:
        dcm, _ = shared_dicom(shared_data, "PNEUMONIA")
        await flag_a_study(offline_aggregator, dcm)
        page = await client.get("/worklist")
        assert page.status_code == 200 and BANNER not in page.text
    finally:
        await client.aclose()
