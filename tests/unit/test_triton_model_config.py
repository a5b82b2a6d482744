"""The committed Triton model configuration is one the official server accepts: it parses as a
Triton ModelConfig, every tensor has non-empty dims, and names/shapes match the committed ONNX."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

MODEL_DIR = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "model_repository" / "pneumonia"


def _config() -> model_config_pb2.ModelConfig:
    return text_format.Parse((MODEL_DIR / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_config_parses_and_every_tensor_has_dims() -> None:
    cfg = _config()
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size > 0
    assert cfg.HasField("dynamic_batching")
    for tensor in [*cfg.input, *cfg.output]:
        assert list(tensor.dims), f"{tensor.name}: Triton refuses empty dims (use dims [1] + reshape [])"


def test_config_matches_every_committed_onnx_version() -> None:
    cfg = _config()
    versions = [p for p in MODEL_DIR.iterdir() if p.is_dir() and (p / "model.onnx").exists()]
    assert versions
    for version in versions:
        session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
        onnx_in = {i.name: i.shape[1:] for i in session.get_inputs()}
        onnx_out = {o.name: o.shape[1:] for o in session.get_outputs()}
        for tensor in cfg.input:
            assert onnx_in[tensor.name] == list(tensor.dims)
        for tensor in cfg.output:
            expected = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
            assert onnx_out[tensor.name] == expected, (version.name, tensor.name)
