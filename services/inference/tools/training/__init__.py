"""Training, calibration and export of the pneumonia model (needs the [train] extra: torch, onnx)."""
