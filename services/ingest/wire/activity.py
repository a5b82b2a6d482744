"""What one association is doing, for the choice of whom to close when the association limit is
reached (scp.py `_evict_for`): a peer stalled in the middle of a PDU, or idle between messages,
gives way to a new association; one whose request we are handling never does."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Activity:
    last_pdu_at: float = field(default_factory=time.monotonic)  # a whole PDU received (or created)
    reading_since: float | None = None  # a PDU read in progress since (fast path only)
    busy: int = 0  # C-STORE requests being handled (validated, stored, committed, answered)

    def pdu_received(self) -> None:
        self.last_pdu_at = time.monotonic()

    def stalled_for(self, now: float) -> float:
        """Seconds in the middle of one PDU (0 when not reading one)."""
        return 0.0 if self.reading_since is None else now - self.reading_since

    def idle_for(self, now: float) -> float:
        """Seconds since the last whole PDU (0 while one of its requests is being handled)."""
        return 0.0 if self.busy else now - self.last_pdu_at
