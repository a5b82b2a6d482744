"""A PACS that accepts the connection and never answers (a real socket, not a mock) does not stall
the aggregator: while the SR C-STORE hangs, events are applied and committed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import select

from harness.silent_pacs import SwitchablePeer
from services.aggregator.config import AggregatorSettings
from services.aggregator.models import SrDelivery, Study
from services.aggregator.service import Aggregator
from tests.support.aggregator_service import apply_events, prediction, received, write_test_policy


async def test_silent_pacs_does_not_stall_event_handling(tmp_path: Path) -> None:
    peer = SwitchablePeer()  # silent: accepts, never answers
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        sr_destination=f"127.0.0.1:{peer.port}:SLOWPACS",
        sr_settle_s=0,  # no hold: the LIKELY_HEALTHY revision is sent in this round
        secret_key="x",
    )
    agg = Aggregator(settings)
    await agg.migrate()
    sender: asyncio.Task[int] | None = None
    try:
        study, sop = "1.2.826.0.1.99.70", "1.2.826.0.1.99.70.1"
        # Two flag changes of one study: two SR deliveries queued; the older one is superseded.
        await apply_events(agg, received(sop, study), prediction(sop, 0.97, study=study))
        await apply_events(agg, prediction(sop, 0.03, "2", study=study))
        sender = asyncio.create_task(agg.send_pending_srs())
        assert await asyncio.to_thread(peer.connected.wait, 60), "the SR sender never connected"

        # The SR association hangs on the silent peer; meanwhile events for another study commit.
        other, other_sop = "1.2.826.0.1.99.71", "1.2.826.0.1.99.71.1"
        await apply_events(agg, received(other_sop, other), prediction(other_sop, 0.97, study=other))
        assert not peer.closed_by_client.is_set() and not sender.done(), "the event waited for the SR send"
        async with agg.sessions() as s:
            row = await s.get(Study, other)
        assert row is not None and row.flag == "URGENT"

        peer.close()  # the hung association ends: the send fails and is recorded as an attempt
        assert await sender == 0
        async with agg.sessions() as s:
            rows = (await s.scalars(select(SrDelivery).where(SrDelivery.study_uid == study))).all()
        deliveries = {d.revision: d for d in rows}
        assert deliveries[1].status == "superseded" and deliveries[1].attempts == 0
        assert deliveries[2].status == "pending" and deliveries[2].attempts == 1 and deliveries[2].last_error
    finally:
        peer.close()
        if sender is not None and not sender.done():
            await asyncio.gather(sender, return_exceptions=True)
        await agg.engine.dispose()
