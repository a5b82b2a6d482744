"""Serving and evaluation must not need PyTorch (training is the optional [train] extra)."""

from __future__ import annotations

import subprocess
import sys


def test_preprocess_and_evaluation_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import services.inference.preprocess\n"
        "import services.inference.tools.evaluation, services.inference.tools.model_cli\n"
        "from services.inference.tools.training import calibrate, dataset, split\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
