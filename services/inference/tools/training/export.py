"""ONNX export (opset 17, dynamic batch), check against PyTorch on real images, and a new version
in the Triton model repository: <repo>/pneumonia/<version>/{model.onnx, metadata.json} + config.pbtxt.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from services.inference.preprocess import preprocess_image_file
from services.inference.repository import next_version as next_version  # the one rule
from services.inference.tools.training.network import PneumoniaNet

MODEL_NAME = "pneumonia"
OPSET = 17

CONFIG_PBTXT = """\
# Triton model configuration for the PneumoTriage pneumonia CNN (written by `pneumotriage model export`).
# input  "image": float32 [N, 1, {s}, {s}]  (services/inference/preprocess.py output)
# output "logit": float32 [N]       uncalibrated logit; calibrated p = sigmoid(logit / T), T in <version>/metadata.json
# output "cam":   float32 [N, {h}, {h}]  class activation map of the logit (mean(cam) == logit)
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "image"
    data_type: TYPE_FP32
    dims: [ 1, {s}, {s} ]
  }}
]
output [
  {{
    name: "logit"
    data_type: TYPE_FP32
    # Triton needs non-empty dims: the model's per-item scalar is presented as [1]
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }},
  {{
    name: "cam"
    data_type: TYPE_FP32
    dims: [ {h}, {h} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 2000
}}
# CPU by default; on a GPU node use the KIND_GPU group below instead (or as well).
instance_group [
  {{
    count: 2
    kind: KIND_CPU
  }}
]
# instance_group [
#   {{
#     count: 1
#     kind: KIND_GPU
#     gpus: [ 0 ]
#   }}
# ]
version_policy: {{ latest: {{ num_versions: 1 }} }}
"""


class _Exportable(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(image)


def export_onnx(model: PneumoniaNet, path: Path, input_size: int) -> None:
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(2, 1, input_size, input_size)
    torch.onnx.export(
        _Exportable(model).eval(),  # a fresh wrapper is in training mode, and export restores it
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=["logit", "cam"],
        dynamic_axes={"image": {0: "N"}, "logit": {0: "N"}, "cam": {0: "N"}},
        opset_version=OPSET,
        dynamo=False,
    )


def check_against_torch(model: PneumoniaNet, onnx_path: Path, images: list[Path], input_size: int) -> dict:
    """Run both on the same real images; max abs differences of logit and cam."""
    from services.inference.preprocess import preprocess_array
    from services.inference.tools.evaluation import read_display_image  # DICOM: the service's display path

    batch = np.stack(
        [
            preprocess_array(read_display_image(p), input_size)
            if p.suffix.lower() == ".dcm"
            else preprocess_image_file(p, input_size)
            for p in images
        ]
    ).astype(np.float32)
    with torch.no_grad():
        t_logit, t_cam = (t.numpy() for t in model.eval()(torch.from_numpy(batch)))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    o_logit, o_cam = session.run(["logit", "cam"], {"image": batch})
    # batch 1 through ONNX too: dynamic batch must work
    o_one = session.run(["logit"], {"image": batch[:1]})[0]
    return {
        "images": len(images),
        "max_abs_diff_logit": float(np.max(np.abs(o_logit - t_logit))),
        "max_abs_diff_cam": float(np.max(np.abs(o_cam - t_cam))),
        "max_abs_diff_batch1": float(np.max(np.abs(o_one - t_logit[:1]))),
        "cam_shape": list(o_cam.shape[1:]),
    }


def write_config(model_dir: Path, input_size: int, cam_size: int, max_batch: int = 32) -> Path:
    """(Re)write config.pbtxt for the exported shapes, keeping an existing version pin (set by
    `pneumotriage model deploy`) so that exporting a version does not silently switch serving."""
    path = model_dir / "config.pbtxt"
    text = CONFIG_PBTXT.format(name=MODEL_NAME, s=input_size, h=cam_size, max_batch=max_batch)
    if path.exists():
        pinned = re.search(r"^version_policy:.*$", path.read_text(), flags=re.MULTILINE)
        if pinned:
            text = re.sub(r"^version_policy:.*$", lambda _: pinned.group(0), text, flags=re.MULTILINE)
    path.write_text(text)
    return path


def export_version(
    model: PneumoniaNet,
    info: dict,
    repository: Path,
    check_images: list[Path],
    version: int | None = None,
    extra_metrics: dict | None = None,
) -> Path:
    """Write <repository>/pneumonia/<version>/ and config.pbtxt; returns the version directory."""
    input_size = int(info["train_config"]["input_size"])
    model_dir = Path(repository) / MODEL_NAME
    version = version or next_version(model_dir)
    vdir = model_dir / str(version)
    onnx_path = vdir / "model.onnx"
    export_onnx(model, onnx_path, input_size)
    check = check_against_torch(model, onnx_path, check_images, input_size)
    if max(check["max_abs_diff_logit"], check["max_abs_diff_cam"]) > 1e-3:
        raise RuntimeError(f"ONNX output differs from PyTorch: {check}")
    write_config(model_dir, input_size, int(check["cam_shape"][0]))
    metadata = {
        "name": MODEL_NAME,
        "version": str(version),
        "input_size": input_size,
        "inputs": {"image": ["N", 1, input_size, input_size]},
        "outputs": {"logit": ["N"], "cam": ["N", *check["cam_shape"]]},
        "preprocess": "services.inference.preprocess.preprocess_array",
        "calibration": {"method": "temperature", "temperature": info["calibration"]["temperature"]},
        "calibration_details": info["calibration"],
        "thresholds": info["thresholds"],
        "trained_at": info.get("trained_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": info["train_seconds"],
        "data_sha256": info["data_sha256"],
        "git_commit": info["git_commit"],
        "git_dirty": info.get("git_dirty"),
        "opset": OPSET,
        "onnx_check": check,
        "metrics": {"val": info["val"], **(extra_metrics or {})},
        "training": {
            k: info[k]
            for k in (
                "train_config",
                "net",
                "best_epoch",
                "n_train",
                "n_val",
                "pos_weight",
                "split_seed",
                "threads",
                "torch_version",
                "history",
                "load_seconds",
            )
        }
        | {k: info[k] for k in ("loadavg", "n_external_held_out") if k in info},
        "size_bytes": onnx_path.stat().st_size,
    }
    (vdir / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
    return vdir
