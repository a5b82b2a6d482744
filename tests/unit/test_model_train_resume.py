"""Long training runs: an interrupted member resumes from its per-epoch checkpoint and ends with
exactly the weights an uninterrupted run makes; an ensemble is one graph whose logit is the mean of
its members' and still the mean of its CAM."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rich.console import Console  # noqa: E402

from services.inference.tools.training import train as train_module  # noqa: E402
from services.inference.tools.training.network import NetConfig, PneumoniaEnsemble, build_network  # noqa: E402
from services.inference.tools.training.train import TrainConfig, fit_member, progress_bar  # noqa: E402

NET = NetConfig(channels=(4, 4, 8, 8, 8), residual=True)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(7)
    x_train = torch.rand((24, 32, 32), generator=gen).to(torch.float16)
    y_train = (torch.arange(24) % 3 == 0).float()
    x_val = torch.rand((8, 32, 32), generator=gen).to(torch.float16)
    y_val = np.array([0, 1] * 4)
    return x_train, y_train, x_val, y_val


def _fit(checkpoint: Path) -> dict:
    config = TrainConfig(epochs=3, batch_size=8, input_size=32, net=NET)
    x_train, y_train, x_val, y_val = _data()
    console = Console(file=io.StringIO())
    torch.manual_seed(0)  # the same initial weights for every run (train() seeds before it builds)
    model = build_network(NET)
    with progress_bar(console) as progress:
        state, history = fit_member(
            model, config, 11, 1e6, x_train, y_train, x_val, y_val, torch.tensor(2.0), checkpoint, progress, console
        )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    return state


def test_an_interrupted_member_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _fit(tmp_path / "whole.pt")

    real_augment, calls = train_module.augment, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the second batch of epoch 2 (3 batches an epoch)
            raise KeyboardInterrupt
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut.pt")
    assert torch.load(tmp_path / "cut.pt", weights_only=False)["planned"] == 3
    monkeypatch.setattr(train_module, "augment", real_augment)
    resumed = _fit(tmp_path / "cut.pt")  # picks up after epoch 1

    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _fit(tmp_path / "ck.pt")
    config = TrainConfig(epochs=3, batch_size=8, input_size=32, net=NET)
    x_train, y_train, x_val, y_val = _data()
    console = Console(file=io.StringIO())
    with progress_bar(console) as progress, pytest.raises(ValueError, match="another run"):
        fit_member(
            build_network(NET), config, 12, 1e6, x_train, y_train, x_val, y_val, torch.tensor(2.0),
            tmp_path / "ck.pt", progress, console,
        )  # fmt: skip


def test_the_ensemble_averages_its_members_and_keeps_the_cam_identity() -> None:
    torch.manual_seed(0)
    ensemble = build_network(NetConfig(channels=NET.channels, residual=True, members=3)).eval()
    assert isinstance(ensemble, PneumoniaEnsemble) and len(ensemble.members) == 3
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logit, cam = ensemble(x)
        members = [m(x)[0] for m in ensemble.members]
        assert torch.allclose(logit, torch.stack(members).mean(0), atol=1e-6)
        assert torch.allclose(cam.mean(dim=(1, 2)), logit, atol=1e-5)
        ensemble.shift_logit(0.5)
        shifted, shifted_cam = ensemble(x)
    assert torch.allclose(shifted, logit + 0.5, atol=1e-5)
    assert torch.allclose(shifted_cam.mean(dim=(1, 2)), shifted, atol=1e-5)


def test_a_time_budget_cut_after_the_first_epoch_ends_the_member(tmp_path: Path) -> None:
    config = TrainConfig(epochs=3, batch_size=8, input_size=32, net=NET)
    x_train, y_train, x_val, y_val = _data()
    console = Console(file=io.StringIO())
    with progress_bar(console) as progress:
        _, history = fit_member(
            build_network(NET), config, 11, 1e-9, x_train, y_train, x_val, y_val, torch.tensor(2.0),
            tmp_path / "ck.pt", progress, console,
        )  # fmt: skip
    assert [h["epoch"] for h in history] == [1]
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["planned"] == 1


@pytest.mark.parametrize("members", [1, 2])
def test_model_adapt_reads_a_network_or_an_ensemble_back_from_its_onnx(tmp_path: Path, members: int) -> None:
    import json

    from services.inference.tools.adapt import net_from_onnx
    from services.inference.tools.training.export import export_onnx

    torch.manual_seed(3)
    config = NetConfig(channels=NET.channels, residual=True, members=members)
    net = build_network(config).train()
    with torch.no_grad():  # BN statistics of real batches, so the folding is exercised
        for _ in range(5):
            net(torch.randn(8, 1, 32, 32) * 2 + 0.5)
    net.eval()
    export_onnx(net, tmp_path / "model.onnx", 32)
    (tmp_path / "metadata.json").write_text(json.dumps({"training": {"net": config.to_dict()}}))
    back, _ = net_from_onnx(tmp_path)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        (logit, cam), (logit_back, cam_back) = net(x), back(x)
    assert torch.allclose(logit, logit_back, atol=1e-4) and torch.allclose(cam, cam_back, atol=1e-4)
