"""Triton python-backend model that serves the pneumonia ONNX graph with onnxruntime.

The official Triton container serves `model.onnx` with its onnxruntime backend (see
deploy/triton/model_repository/pneumonia/config.pbtxt). The tritonserver shipped in the
nvidia-pytriton wheel has the python backend only, so CPU-only installs and the test suite serve
the very same ONNX file through this model: `pneumotriage model deploy` copies it next to
model.onnx in each version directory. Inputs and outputs match the ONNX graph:
image float32 [N,1,S,S] -> logit float32 [N], cam float32 [N,h,w].

This file runs inside the Triton python-backend stub, not in the inference service.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the Triton python-backend stub


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0") or 0)
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(version_dir, params.get("onnx_file", "model.onnx") or "model.onnx"),
            options,
            providers=["CPUExecutionProvider"],
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests: list) -> list:
        # Dynamic batching hands us several requests: run them as one batch, then split.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        batch = np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=np.float32)
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size]))
                for name, out in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
