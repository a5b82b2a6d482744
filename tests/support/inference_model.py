"""A small random-weight ONNX model with the agreed I/O, and a model repository around it.

Used until (and beside) the committed model: input "image" float32 [N,1,S,S] (dynamic N), outputs
"logit" float32 [N] and "cam" float32 [N,S/16,S/16] (global-average-pool + linear head, so the CAM is
the per-location logit and the logit is its mean). Needs torch (the [train] extra).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from services.inference.triton_python import MODEL_PY, python_backend_config


def build_tiny_onnx(path: Path, input_size: int = 224, seed: int = 0) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class TinyCam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.head = nn.Conv2d(16, 1, 1)

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cam = self.head(self.features(image))[:, 0]
            return cam.mean(dim=(1, 2)), cam

    model = TinyCam().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, input_size, input_size),),
        str(path),
        input_names=["image"],
        output_names=["logit", "cam"],
        dynamic_axes={"image": {0: "N"}, "logit": {0: "N"}, "cam": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def write_version(
    repository: Path, version: int, onnx_path: Path, *, name: str = "pneumonia", temperature: float = 1.5
) -> Path:
    """One version directory as `model export` lays it out: model.onnx + metadata.json (+ model.py)."""
    vdir = repository / name / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(onnx_path, vdir / "model.onnx")
    shutil.copy2(MODEL_PY, vdir / "model.py")
    import onnx

    size = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    meta = {
        "name": name,
        "version": str(version),
        "input_size": int(size),
        "calibration": {"method": "temperature", "temperature": temperature},
    }
    (vdir / "metadata.json").write_text(json.dumps(meta, indent=2))
    return vdir


def make_repository(repository: Path, onnx_path: Path, *, name: str = "pneumonia", input_size: int = 224) -> Path:
    """A python-backend model repository with version 1 of onnx_path."""
    (repository / name).mkdir(parents=True, exist_ok=True)
    (repository / name / "config.pbtxt").write_text(python_backend_config(name, input_size, intra_op_threads=1))
    write_version(repository, 1, onnx_path, name=name)
    return repository
