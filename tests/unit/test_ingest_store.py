"""ContentStore.put_spool: a spooled data set moves into the content-addressed store durably, and a
name already there is reused only when it holds exactly the same bytes."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.ingest.store import ContentStore
from services.ingest.wire.spool import Spool

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def spooled(directory: Path, payload: bytes) -> Spool:
    spool = Spool(directory, DX, generate_uid(), ExplicitVRLittleEndian)
    spool.write(payload)
    spool.complete = True
    return spool


def test_put_spool_moves_the_file_and_reuses_identical_content(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    incoming = tmp_path / "store" / ".incoming"
    incoming.mkdir(parents=True)
    first = spooled(incoming, b"\x01" * 5000)
    stored = store.put_spool(first)
    assert stored.created and stored.path.read_bytes()[-5000:] == b"\x01" * 5000
    assert stored.path == store.path_for(stored.sha256) and not first.path.exists()
    # the same bytes again (same SOP instance resent): the spool is dropped, the file reused
    again = Spool(incoming, first.sop_class_uid, first.sop_instance_uid, ExplicitVRLittleEndian)
    again.write(b"\x01" * 5000)
    assert store.put_spool(again).created is False
    assert not again.path.exists() and list(incoming.iterdir()) == []


def test_a_leftover_with_the_right_size_but_other_bytes_is_replaced(tmp_path: Path) -> None:
    """A crash between the rename and the fsync can leave the final name with lost data; the size
    alone would call it stored, and a resent image would be acknowledged against a torn file."""
    store = ContentStore(tmp_path / "store")
    incoming = tmp_path / "store" / ".incoming"
    incoming.mkdir(parents=True)
    spool = spooled(incoming, b"\x02" * 5000)
    final = store.path_for(spool.sha256)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"\x00" * spool.size)  # same length, not the content
    stored = store.put_spool(spool)
    assert stored.created
    assert final.read_bytes()[-5000:] == b"\x02" * 5000
