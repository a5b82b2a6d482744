"""The differential wire fuzzer (issue 22): generated DICOM message sequences (splits, interleavings,
wrong and unaccepted contexts, empty-PDV floods, garbage and unknown commands, releases, aborts,
re-sent and re-used UIDs) played against ingest twice, with the fast path (our PDU reader, C-STORE
taken past pynetdicom's DIMSE layer) and with pynetdicom's own path, the same C-STORE handler behind
both. It fails on:

- any difference in what the peer got back (each response's message ID, status and SOP instance,
  and whether the association was released or ended), or in the bytes stored;
- any stored file that is not byte for byte the data set of exactly one C-STORE request, under that
  request's SOP Instance UID, answered 0x0000 (the invariant "one C-STORE, one file");
- any response naming another SOP instance than its request.

A failure prints the seed: `PT_WIRE_FUZZ_SEEDS=<seed> pytest tests/integration/test_ingest_wire_differential.py`
replays it, and a seed that found a defect becomes a line of REGRESSION_SEEDS. The default run plays
PT_WIRE_FUZZ_N sequences (2,000, about 80 s); `-m slow` plays 20,000 more.

pynetdicom's own network thread dies on a command field it does not know (KeyError in its
decoder, after our guard has already asked for the abort): that thread exception is expected on the
library path and filtered below.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.rabbitmq import RabbitNode
from services.ingest.app import IngestService
from services.ingest.scp import STORE_PATHS
from tests.support.ingest_service import AE_TITLE, ingest_settings
from tests.support.wire_fuzz import Generator, Request, Transcript, play

# Seeds that once found a difference or a broken invariant (kept as regression tests). Generated
# UIDs carry their seed (1.2.826.0.1.3680043.9.7433.2.<seed>.<n>), so a batch failure names it.
# 26: on e0b5246 it stored a file spliced from two C-STOREs (the first cut at an element boundary,
# the second answered 0x0000): "a stored file that is not the data set of one request".
REGRESSION_SEEDS: list[int] = [26]
BATCH = 25  # sequences between two looks at the stores


def _dataset_of(stored: bytes) -> tuple[str, bytes]:
    """(SOP Instance UID in the File Meta, the data set after it) of a stored Part 10 file."""
    assert stored[128:132] == b"DICM", "no DICOM preamble"
    (meta_len,) = struct.unpack_from("<L", stored, 132 + 8)
    meta_end = 132 + 12 + meta_len
    pos, uid = 132 + 12, ""
    while pos < meta_end:
        group, elem, vr = struct.unpack_from("<HH2s", stored, pos)
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            (length,) = struct.unpack_from("<L", stored, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", stored, pos + 6)
            start = pos + 8
        if (group, elem) == (0x0002, 0x0003):
            uid = stored[start : start + length].rstrip(b"\x00 ").decode()
        pos = start + length
    return uid, stored[meta_end:]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*.dcm")}


class Pair:
    """The two ingest services: fast path and pynetdicom's own path, same settings otherwise."""

    def __init__(self, fast: IngestService, library: IngestService) -> None:
        self.fast, self.library = fast, library
        self.known = {"fast": _files(fast.store.root), "library": _files(library.store.root)}
        self.history: list[Request] = []
        self.pool = ThreadPoolExecutor(2)

    def play(self, steps: list) -> tuple[Transcript, Transcript]:
        a = self.pool.submit(play, self.fast.dicom_port, AE_TITLE, steps)
        b = self.pool.submit(play, self.library.dicom_port, AE_TITLE, steps)
        return a.result(), b.result()

    def new_files(self) -> dict[str, dict[str, bytes]]:
        """Per path: sha256 -> bytes of the files stored since the last look."""
        out: dict[str, dict[str, bytes]] = {}
        for name, service in (("fast", self.fast), ("library", self.library)):
            now = _files(service.store.root)
            out[name] = {p.stem: p.read_bytes() for p in now - self.known[name]}
            self.known[name] = now
        return out


@pytest.fixture
async def pair(tmp_path: Path, rabbit: RabbitNode, broker: object) -> AsyncIterator[Pair]:
    fast = await IngestService(ingest_settings(tmp_path / "fast", rabbit.url, fast_path=True)).start(http=False)
    library = await IngestService(ingest_settings(tmp_path / "library", rabbit.url, fast_path=False)).start(http=False)
    try:
        assert fast.scp is not None and fast.scp.fast_path
        assert library.scp is not None and not library.scp.fast_path
        yield Pair(fast, library)
    finally:
        await fast.stop()
        await library.stop()


def _ended(end: str) -> str:
    return "ended" if end in ("aborted", "closed") else end


def _check_batch(pair: Pair, batch: list[tuple[int, list[Request], Transcript]]) -> None:
    """The invariant and the stored-bytes difference over one batch of sequences."""
    files = pair.new_files()
    seeds = [seed for seed, _, _ in batch]
    fast_sets = {_dataset_of(b) for b in files["fast"].values()}
    library_sets = {_dataset_of(b) for b in files["library"].values()}
    assert fast_sets == library_sets, f"stored bytes differ between the paths, seeds {seeds}"
    answered_ok: dict[tuple[str, bytes], int] = {}
    for seed, requests, transcript in batch:
        ok_ids = {mid for mid, status, _ in transcript.responses if status == 0x0000}
        for request in requests:
            if request.message_id in ok_ids and request.dataset:
                answered_ok[(request.sop_instance, request.dataset)] = seed
    for name, stored in files.items():
        for sha, data in stored.items():
            assert hashlib.sha256(data).hexdigest() == sha, f"{name}: a file not named by its content"
            key = _dataset_of(data)
            assert key in answered_ok, (
                f"{name}: a stored file that is not the data set of one request answered 0x0000 "
                f"(SOP instance {key[0]}), seeds {seeds}"
            )


async def _fuzz(pair: Pair, seeds: list[int]) -> None:
    import asyncio

    batch: list[tuple[int, list[Request], Transcript]] = []
    for seed in seeds:
        generator = Generator(seed, pair.history)
        steps = generator.sequence()
        fast, library = await asyncio.to_thread(pair.play, steps)
        what = [s.what for s in steps]
        assert fast.responses == library.responses and _ended(fast.end) == _ended(library.end), (
            f"seed {seed} ({what}): fast path {fast} / pynetdicom {library}"
        )
        by_id = {r.message_id: r for r in generator.requests}
        for mid, _, uid in fast.responses:
            assert mid in by_id and by_id[mid].sop_instance == uid, f"seed {seed}: a response for another request"
        ok = {mid for mid, status, _ in fast.responses if status == 0x0000}
        pair.history.extend(r for r in generator.requests if r.message_id in ok and r.dataset)
        batch.append((seed, generator.requests, fast))
        if len(batch) == BATCH:
            await asyncio.to_thread(_check_batch, pair, batch)
            batch = []
    if batch:
        await asyncio.to_thread(_check_batch, pair, batch)


def _seeds(default: range) -> list[int]:
    given = os.environ.get("PT_WIRE_FUZZ_SEEDS", "")
    return [int(s) for s in given.split(",") if s.strip()] if given else list(default)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_both_paths_agree_on_generated_sequences(pair: Pair) -> None:
    n = int(os.environ.get("PT_WIRE_FUZZ_N", "2000"))
    wire_before = STORE_PATHS.labels("wire")._value.get()
    await _fuzz(pair, [*REGRESSION_SEEDS, *_seeds(range(1, n + 1))])
    if not os.environ.get("PT_WIRE_FUZZ_SEEDS"):  # (a replayed seed may store nothing)
        # the fast path really took C-STOREs past pynetdicom's DIMSE layer (this is not two library runs)
        assert STORE_PATHS.labels("wire")._value.get() > wire_before
        assert len(pair.history) > 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_both_paths_agree_on_many_more_sequences(pair: Pair) -> None:
    await _fuzz(pair, _seeds(range(100_000, 120_000)))
