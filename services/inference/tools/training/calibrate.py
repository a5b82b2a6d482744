"""Calibration on the validation split and operating thresholds (numpy only).

Calibration is Platt scaling ``p = sigmoid(a * logit + b)`` fitted by Newton's method on the
validation logits. It is stored in the interface's temperature form: the offset is folded into the
network's head bias before export (``logit' = logit + b / a``, which shifts the CAM by the same
constant, keeping ``logit' = mean(cam')``) and ``T = 1 / a``, so the calibrated probability is
``sigmoid(logit' / T)``. The offset is needed because the class-weighted loss moves the logits.

The maths is services/core/calibration.py (one implementation for training, evaluation, the
aggregator and the benches); this module names what the training recipe uses.
"""

from __future__ import annotations

from services.core.calibration import choose_thresholds, fit_platt, log_loss, sigmoid

__all__ = ["choose_thresholds", "fit_platt", "log_loss", "sigmoid"]
