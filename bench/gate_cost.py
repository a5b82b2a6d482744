"""Cost of the input gate per image, against the preprocessing it runs beside (same image, same run,
interleaved): a 224 px copy as in ../shared and a 2048 x 2500 12-bit DX as a detector sends.

    python bench/gate_cost.py [--repeat 40]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.gate import DEFAULT_GATE_FILE, gate_image  # noqa: E402
from services.inference.preprocess import INPUT_SIZE, preprocess_dicom  # noqa: E402
from services.inference.tools.gate_fit import chest_dicom, load_gray, resize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/kermany224/train/NORMAL")
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    gray = load_gray(sorted(args.data.glob("*.jpeg"))[0])
    gate = str(DEFAULT_GATE_FILE)
    for label, arr in (("224 x 224 8-bit", gray), ("2048 x 2500 12-bit", resize(gray, 2500, 2048))):
        ds = pydicom.dcmread(io.BytesIO(chest_dicom(arr, bits=8 if arr is gray else 12)))
        _ = ds.pixel_array  # decoded once, as in the service (pydicom caches it)
        gate_image(ds, gate)
        g = p = 0.0
        n = args.repeat if arr is gray else max(4, args.repeat // 5)
        for _ in range(n):
            t = time.perf_counter()
            gate_image(ds, gate)
            g += time.perf_counter() - t
            t = time.perf_counter()
            preprocess_dicom(ds, INPUT_SIZE)
            p += time.perf_counter() - t
        ms = f"gate {g / n * 1000:6.1f} ms  preprocess {p / n * 1000:6.1f} ms"
        print(f"{label:20s} {ms}  gate/preprocess {g / p:.2f}")


if __name__ == "__main__":
    main()
