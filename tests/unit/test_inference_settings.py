"""The embedded runtime's thread count: one decode thread and onnxruntime on the CPUs left."""

from __future__ import annotations

import os

import pytest

from services.inference.config import InferenceSettings


def test_auto_threads_leave_a_cpu_per_decoder() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert InferenceSettings().decode_workers == 1
    assert InferenceSettings().resolved_ort_threads() == max(1, cpus - 1)
    assert InferenceSettings(decode_workers=3).resolved_ort_threads() == max(1, cpus - 3)
    assert InferenceSettings(decode_processes=2, decode_workers=5).resolved_ort_threads() == max(1, cpus - 2)
    assert InferenceSettings(decode_workers=cpus + 4).resolved_ort_threads() == 1


def test_a_set_thread_count_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PT_INFERENCE_ORT_THREADS", "3")
    assert InferenceSettings().resolved_ort_threads() == 3
