"""Inference tooling, not imported by the running inference service.

- `training/`: dataset scan, patient split (`split.json`), the network, training, calibration and
  ONNX export (`pneumotriage model train|export`; torch only here, the `[train]` extra);
- `evaluation`, `proxy`: held-out and proxy-external evaluation (`model evaluate|proxy-eval`);
- `gate_fit`: fitting and evaluating the input gate (`model gate-fit|gate-evaluate`);
- `model_cli`, `gate_cli`: those commands (mounted by `services/inference/cli.py`);
- `local_triton`: starts the tritonserver binary from the nvidia-pytriton wheel on loopback for tests,
  benchmarks and CPU-only installs (production runs the official Triton container).

The service itself is `services.inference.app` and what it imports: runtime, worker, gate,
preprocess, heatmaps, repository (`tests/unit/test_import_graph.py` keeps it that way).
"""
