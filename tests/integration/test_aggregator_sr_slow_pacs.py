"""A PACS that accepts the connection and never answers (a real socket, not a mock) does not stall
the aggregator: while the SR C-STORE hangs, events are applied and committed."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

from sqlalchemy import select

from services.aggregator.config import AggregatorSettings
from services.aggregator.models import SrDelivery, Study
from services.aggregator.service import Aggregator
from tests.support.aggregator_service import apply_events, prediction, received, write_test_policy


class SilentPeer:
    """A TCP listener that accepts every connection and never sends a byte (a hung PACS)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self.accepted = threading.Event()
        self.closed_by_client = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.accepted.set()
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        """Read (and ignore) what the client sends; note when it gives up and closes."""
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        self.closed_by_client.set()

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


async def test_silent_pacs_does_not_stall_event_handling(tmp_path: Path) -> None:
    peer = SilentPeer()
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
        assert await asyncio.to_thread(peer.accepted.wait, 60), "the SR sender never connected"

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
