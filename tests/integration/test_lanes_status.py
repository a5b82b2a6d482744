"""`pneumotriage status` (issue 24, item 3) against a real RabbitMQ node: the backlog per stage and lane
from the queues, the services' pt_lane_* gauges merged in, a progress bar while a lane drains."""

from __future__ import annotations

import asyncio
import uuid

from typer.testing import CliRunner

from harness.rabbitmq import RabbitNode
from services.cli import app
from services.core import status as st
from services.core.broker import Broker
from services.core.contracts import ImageReceived, ImageRef
from services.core.lanes import BACKFILL
from services.core.net import free_port


async def test_status_shows_each_lane_of_each_stage(rabbit: RabbitNode) -> None:
    vhost = f"status-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbit.ctl, "add_vhost", vhost)
    await asyncio.to_thread(rabbit.ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = f"{rabbit.url.rstrip('/')}/{vhost}"
    try:
        producer = await Broker(url).connect()
        for i in range(30):
            msg = ImageReceived(image=ImageRef(sop_instance_uid=f"1.{i}", lane=BACKFILL))
            await producer.publish("image.received", msg, message_id=f"m{i}")
        await producer.close()
        nowhere = f"http://127.0.0.1:{free_port()}/metrics"
        result = await asyncio.to_thread(CliRunner().invoke, app, ["status", "--amqp-url", url, "--metrics", nowhere])
        assert result.exit_code == 0, result.output
        lines = {tuple(line.split()[:3]) for line in result.output.splitlines()[1:]}
        for stage in ("inference", "labeling", "aggregator"):
            assert (stage, "backfill", "30") in lines, result.output
            assert (stage, "fresh", "0") in lines, result.output
        # while it drains: the rate from the depth's fall (no /metrics), an ETA and a progress bar
        table = st.rows()
        st.update(table, {r.queue: (30, 1) for r in table}, {}, 100.0)
        st.update(table, {r.queue: (10, 1) for r in table}, {}, 110.0)
        row = next(r for r in table if (r.stage, r.lane) == ("inference", BACKFILL))
        assert row.rate == 2.0 and row.eta_s == 5.0
        assert "[################--------]  67%" in st.render(table)
    finally:
        await asyncio.to_thread(rabbit.ctl, "delete_vhost", vhost, check=False)


def test_lane_gauges_from_metrics_pages() -> None:
    page = "\n".join(
        [
            "# HELP pt_lane_drain_rate x",
            'pt_lane_drain_rate{lane="backfill",stage="inference"} 42.5',
            'pt_lane_oldest_age_seconds{lane="backfill",stage="inference"} 12.0',
            'pt_lane_queue_depth{lane="fresh",stage="aggregator"} 3.0',
        ]
    )
    parsed = st.parse_metrics(page)
    assert parsed[("pt_lane_drain_rate", "inference", "backfill")] == 42.5
    assert parsed[("pt_lane_oldest_age_seconds", "inference", "backfill")] == 12.0
    table = st.rows()
    st.update(table, {r.queue: (85, 1) for r in table}, parsed, 1.0)
    row = next(r for r in table if (r.stage, r.lane) == ("inference", BACKFILL))
    assert row.rate == 42.5 and row.eta_s == 2.0 and row.oldest_age_s == 12.0
