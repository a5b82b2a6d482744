"""One table of transfer syntaxes (services/ingest/transfer_syntaxes.py): every consumer agrees with it.

The SCP proposes exactly the table, in its order; validation probes what the table says; the wire
scan reads the encoding the table (pydicom) gives; make-dicom writes every syntax the table gives a
recipe, and ingest accepts each file; the conformance statement lists exactly the table."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts, _config
from pynetdicom.sop_class import Verification

from harness.dicom_peers import STORESCU_SYNTAX_FLAGS
from services.ingest import validate
from services.ingest.cli import Syntax
from services.ingest.commitment import STORAGE_COMMITMENT_PUSH
from services.ingest.config import IngestSettings
from services.ingest.scp import IngestSCP
from services.ingest.tools import conformance_doc
from services.ingest.tools.make_dicom import TRANSFER_SYNTAXES as MAKE_DICOM_SYNTAXES
from services.ingest.tools.make_dicom import make_dicom_file
from services.ingest.transfer_syntaxes import ACCEPTED, BY_UID, RECIPES, TRANSFER_SYNTAXES, Lossy, PixelCheck
from services.ingest.wire.pixel_scan import PixelLengthScan


def test_every_row_is_a_distinct_transfer_syntax_pydicom_knows() -> None:
    assert len(BY_UID) == len(TRANSFER_SYNTAXES) == len(ACCEPTED)
    assert len(RECIPES) == sum(ts.make_dicom is not None for ts in TRANSFER_SYNTAXES)
    for ts in TRANSFER_SYNTAXES:
        assert UID(ts.uid).is_transfer_syntax and not UID(ts.uid).is_private, ts.uid
        native = not UID(ts.uid).is_encapsulated
        assert (ts.check is PixelCheck.LENGTH) == native, ts.name  # native: its length; encapsulated: a probe
        assert bool(ts.lossy_method) == (ts.lossy is not Lossy.NO), ts.name
        if ts.make_dicom is not None and ts.make_dicom.lossy:
            assert ts.lossy is not Lossy.NO, ts.name


def test_the_scp_accepts_exactly_the_table_in_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOG_HANDLER_LEVEL", "STORE_RECV_CHUNKED_DATASET"):  # _make_ae sets these globals
        monkeypatch.setattr(_config, name, getattr(_config, name))
    ae = IngestSCP._make_ae(SimpleNamespace(settings=IngestSettings()))  # type: ignore[arg-type]
    storage = [cx for cx in ae.supported_contexts if cx.abstract_syntax not in (Verification, STORAGE_COMMITMENT_PUSH)]
    assert {cx.abstract_syntax for cx in storage} >= {cx.abstract_syntax for cx in AllStoragePresentationContexts}
    for cx in storage:
        assert list(cx.transfer_syntax) == list(ACCEPTED), cx.abstract_syntax


def test_validation_probes_what_the_table_says() -> None:
    probes = {
        PixelCheck.JPEG: validate.JPEG_SYNTAXES,
        PixelCheck.J2K: validate.J2K_SYNTAXES,
        PixelCheck.RLE: validate.RLE_SYNTAXES,
    }
    for ts in TRANSFER_SYNTAXES:
        for check, uids in probes.items():
            assert (ts.uid in uids) == (ts.check is check), ts.name
        assert (ts.uid in validate.DEFLATED) == UID(ts.uid).is_deflated, ts.name


def test_the_wire_scan_reads_the_encoding_the_table_gives() -> None:
    for ts in TRANSFER_SYNTAXES:
        scan = PixelLengthScan(ts.uid)
        assert scan.implicit == UID(ts.uid).is_implicit_VR, ts.name
        assert scan.active == (not UID(ts.uid).is_deflated), ts.name


def test_make_dicom_writes_every_recipe_and_ingest_accepts_it(shared_data: Path, tmp_path: Path) -> None:
    assert MAKE_DICOM_SYNTAXES == {name: ts.uid for name, (ts, _) in RECIPES.items()}
    assert [s.value for s in Syntax] == list(RECIPES)  # the CLI's --transfer-syntax choices
    image = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[0]
    settings = IngestSettings()
    for name, (ts, recipe) in RECIPES.items():
        path = make_dicom_file(image, tmp_path, transfer_syntax=name, bits=max(recipe.bits))
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == ts.uid, name
        decision = validate.decide(path, settings)
        assert decision.stored and decision.transfer_syntax_uid == ts.uid, (name, decision.reason)


def test_the_conformance_statement_lists_exactly_the_table() -> None:
    block = conformance_doc.documented(conformance_doc.DOC.read_text())
    assert block == conformance_doc.render(), "run `python -m services.ingest.tools.conformance_doc`"
    listed = re.findall(r"^\| [^|]+ \| (1\.2\.840\.10008\.[0-9.]+) \|", block, flags=re.MULTILINE)
    assert listed == list(ACCEPTED)


def test_the_test_peers_propose_only_accepted_syntaxes() -> None:
    assert set(STORESCU_SYNTAX_FLAGS) <= set(ACCEPTED)
