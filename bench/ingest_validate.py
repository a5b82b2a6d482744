"""CPU per image of ingest's validation (what runs before a C-STORE is answered) against a full pixel
decode with pydicom, for each transfer syntax make-dicom writes (same image, same size).

    python bench/ingest_validate.py                 # 1024 x 1024, 16 bit (8 bit for JPEG baseline)
    python bench/ingest_validate.py --size 512 --repeat 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from services.ingest.app import quiet_pydicom  # noqa: E402
from services.ingest.config import IngestSettings  # noqa: E402
from services.ingest.tools.make_dicom import DicomOptions, make_dicom_file  # noqa: E402
from services.ingest.transfer_syntaxes import RECIPES  # noqa: E402
from services.ingest.validate import decide  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "kermany224" / "train" / "NORMAL"


def cpu_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    started = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - started) * 1000 / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    quiet_pydicom()
    image = sorted(SHARED.glob("*.jpeg"))[0]
    settings = IngestSettings()
    work = Path(tempfile.mkdtemp(prefix="pt-bench-validate-"))
    print(f"{args.size} x {args.size}, CPU ms per image (mean of --repeat runs; compare rows)")
    print(f"{'transfer syntax':16} {'bits':>4} {'validate':>9} {'decode':>9}")
    for name, (_, recipe) in RECIPES.items():  # every syntax make-dicom writes (the table's recipes)
        bits = max(recipe.bits)
        path = make_dicom_file(image, work, DicomOptions(transfer_syntax=name, bits=bits, size=args.size))
        assert decide(path, settings).stored, name
        validate = cpu_ms(lambda p=path: decide(p, settings), args.repeat)
        decode = cpu_ms(lambda p=path: pydicom.dcmread(p).pixel_array, args.repeat)
        print(f"{name:16} {bits:>4} {validate:>9.2f} {decode:>9.2f}")


if __name__ == "__main__":
    main()
