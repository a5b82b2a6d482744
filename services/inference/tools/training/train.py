"""Train the pneumonia CNN on CPU in bounded time, calibrate it on the validation split and export
it into the Triton model repository.

Design choices (see docs/model-card.md):
- all images are decoded once into memory through the serving preprocessing (services/inference/
  preprocess.py: the same resize), kept as [0, 1] float16;
- augmentation suited to radiographs, done per batch in torch: gamma (the only intensity change that
  survives per-image standardisation), small rotation, anisotropic scale (the training copy is
  squashed, real DICOM is letter-boxed: scale jitter exposes the network to both), translation,
  mild blur/noise. No horizontal flip: the heart, aortic knob and stomach bubble are lateralised and
  a flipped chest is not an image the model will ever be shown;
- class imbalance (about 3 pneumonia : 1 normal) handled by ``pos_weight`` in the BCE loss;
- AdamW, linear warm-up then cosine decay; model selected on validation AUC; deterministic seed,
  2 threads. Bounded time: after the first epoch the number of epochs is cut (once) so that the
  run fits ``max_minutes``; the cosine schedule is re-planned for the new length, so a shared,
  slow machine still ends with an annealed model. Same epoch count -> same model.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sklearn.metrics import roc_auc_score

from services.inference.preprocess import CLIP, INPUT_SIZE, resize_to_fit
from services.inference.tools.training.calibrate import choose_thresholds, fit_platt, log_loss, sigmoid
from services.inference.tools.training.dataset import ImageRecord
from services.inference.tools.training.network import NetConfig, PneumoniaEnsemble, PneumoniaNet, build_network
from services.inference.tools.training.sources import load_training_data, split_for
from services.inference.tools.training.split import SPLIT_FILE, assign, load_split, make_split, save_split


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 5e-4
    input_size: int = INPUT_SIZE
    seed: int = 1234
    threads: int = 2
    max_minutes: float = 28.0  # wall-time budget: the epoch count is cut after epoch 1 to fit it
    warmup: float = 0.1  # fraction of the steps with linear warm-up
    limit: int | None = None  # use at most this many training images (smoke runs)
    hold_out_external: bool = True  # never train or validate on the proxy-external batches (proxy.py)
    label_smoothing: float = 0.05
    ema_decay: float = 0.998  # exported weights: exponential moving average of the trained ones
    calibration_prior: float = 0.6  # P(pneumonia) the calibrated probability assumes (docs/model-card.md)
    operating_sensitivity: float = 0.98  # operating threshold: highest keeping this val sensitivity
    augment_strength: float = 1.0  # 0: v1's augmentation; 1: the photometric/resolution suite below
    net: NetConfig = field(default_factory=NetConfig)


class WeightAverage:
    """Exponential moving average of the weights and BN buffers; the decay ramps up as
    min(decay, (1 + t) / (10 + t)) so short runs are not dominated by the initial weights."""

    def __init__(self, model: PneumoniaNet, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(model).eval()
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: PneumoniaNet) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps)) if self.decay > 0 else 0.0
        self.steps += 1
        for avg, cur in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(cur.detach(), alpha=1 - d)
            else:
                avg.copy_(cur)


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the steps, then cosine decay to 1 %."""
    warm = max(1, int(total * config.warmup))
    if step < warm:
        return config.lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return config.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def load_images(records: list[ImageRecord], size: int, progress: Progress | None = None) -> torch.Tensor:
    """[N, size, size] float16 display images in [0, 1] (square sources: resized; others: letter-boxed
    content only, padding happens after standardisation, exactly as in preprocess_array)."""
    out = torch.zeros((len(records), size, size), dtype=torch.float16)
    task = progress.add_task("load images", total=len(records), info="") if progress else None
    from services.inference.tools.evaluation import read_display_image  # DICOM: the service's display path

    for i, rec in enumerate(records):
        content, (top, left, h, w) = resize_to_fit(read_display_image(rec.path), size)
        block = torch.from_numpy(np.array(content, dtype=np.float32))
        # mark padding with NaN so that standardise() can use content-only statistics
        canvas = torch.full((size, size), float("nan"))
        canvas[top : top + h, left : left + w] = block
        out[i] = canvas.to(torch.float16)
        if progress is not None and task is not None:
            progress.advance(task)
    return out


def standardise(x: torch.Tensor) -> torch.Tensor:
    """[N, S, S] display images with NaN padding -> [N, 1, S, S] as preprocess_array produces."""
    x = x.float()
    valid = ~torch.isnan(x)
    n = valid.sum(dim=(1, 2)).clamp_min(1)
    xz = torch.where(valid, x, torch.zeros_like(x))
    mean = xz.sum(dim=(1, 2)) / n
    var = (torch.where(valid, x - mean[:, None, None], torch.zeros_like(x)) ** 2).sum(dim=(1, 2)) / n
    std = var.sqrt().clamp_min(1e-3)
    out = ((xz - mean[:, None, None]) / std[:, None, None]).clamp(-CLIP, CLIP)
    return torch.where(valid, out, torch.zeros_like(out)).unsqueeze(1)


def photometric(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Acquisition-like changes of a [N, S, S] display image in [0, 1] (square, no padding): window
    (clipping or flattening the grey range), blur + down-sampling to a lower resolution and back,
    detector noise. Each applied to a random half of the batch."""
    n, size = x.shape[0], x.shape[-1]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    def some(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) < p * strength)[:, None, None]

    lo, hi = uniform(-0.3, 0.25), uniform(0.75, 1.3)  # window: <0 / >1 flatten, inside clips
    x = torch.where(some(0.5), ((x - lo[:, None, None]) / (hi - lo)[:, None, None]).clamp(0.0, 1.0), x)
    factor = float(1.5 + 2.0 * torch.rand(1, generator=gen))  # one resolution per batch
    small = F.interpolate(x[:, None], size=max(16, int(size / factor)), mode="bilinear", antialias=True)
    x = torch.where(some(0.4), F.interpolate(small, size=size, mode="bilinear")[:, 0], x)
    return (x + some(0.5) * uniform(0.0, 0.04)[:, None, None] * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def augment(x: torch.Tensor, gen: torch.Generator, strength: float = 0.0) -> torch.Tensor:
    """x: [N, S, S] display images (NaN padding) -> augmented, standardised [N, 1, S, S].
    ``strength`` 0 is v1's recipe; 1 adds the photometric suite, wider gamma/rotation/scale and
    zoom-out with a black (collimated) border instead of the mean grey."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    s = strength
    x = x.float().clamp(0.0, 1.0)
    if s > 0 and not torch.isnan(x).any():
        x = photometric(x, gen, s)
    x = x.clamp(0.0, 1.0) ** torch.exp(uniform(-0.3 - 0.3 * s, 0.3 + 0.3 * s))[:, None, None]
    if s > 0:  # a black border (collimation, zoom-out) is part of the image, not padding
        size = x.shape[-1]
        x = x.clone()
        for i in torch.nonzero(torch.rand(n, generator=gen) < 0.3 * s).flatten().tolist():
            m = int(float(torch.rand(1, generator=gen)) * 0.18 * size)
            if m > 0:
                inner = F.interpolate(x[i][None, None], size=size - 2 * m, mode="bilinear", antialias=True)
                x[i] = F.pad(inner[0, 0], (m, m, m, m))
    x = standardise(x)
    angle = uniform(-8.0 - 4.0 * s, 8.0 + 4.0 * s) * math.pi / 180.0
    sx, sy = uniform(0.88 - 0.08 * s, 1.15 + 0.1 * s), uniform(0.88 - 0.08 * s, 1.15 + 0.1 * s)
    tx, ty = uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1
    )  # [N, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    noise = uniform(0.0, 0.08)[:, None, None, None]
    return x + noise * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def predict_logits(model: PneumoniaNet, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    model.eval()
    out = [model(standardise(images[i : i + batch_size]))[0] for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty() -> bool:
    """True when the model code differs from the recorded commit (uncommitted changes)."""
    try:
        out = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--",
                "services/inference/tools/training",
                "services/inference/preprocess.py",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[4],
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return True
    return bool(out.strip())


def auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def member_checkpoint(directory: Path, index: int) -> Path:
    return Path(directory) / f"member-{index + 1}.pt"


def fit_member(
    model: PneumoniaNet,
    config: TrainConfig,
    seed: int,
    budget_minutes: float,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: np.ndarray,
    pos_weight: torch.Tensor,
    checkpoint: Path | None,
    progress: Progress,
    console: Console,
    label: str = "",
) -> tuple[dict, list[dict]]:
    """Train one network; returns the EMA weights at the end of the annealed schedule and the
    per-epoch history. After every epoch the whole state (weights, EMA, optimiser, random
    generators, planned length) goes to ``checkpoint``; a run that finds one resumes after its last
    epoch with the same plan, so an interrupted run ends with the model an uninterrupted one makes."""
    started = time.time()
    torch.manual_seed(seed)
    ema = WeightAverage(model, config.ema_decay)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    planned, first = config.epochs, 0
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved.get("seed") != seed or saved.get("n_train") != len(x_train):
            raise ValueError(f"{checkpoint} belongs to another run (seed or data differ): remove it or pick another")
        model.load_state_dict(saved["model"])
        ema.module.load_state_dict(saved["ema"])
        ema.steps = saved["ema_steps"]
        optimiser.load_state_dict(saved["optimiser"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        history, planned = [{**h, "resumed": True} for h in saved["history"]], saved["planned"]
        first = len(history)
        console.print(f"{label}resumed from {checkpoint} after epoch {first} of {planned}")
    epochs_task = progress.add_task(f"{label}epochs", total=planned, completed=first, info="")
    epoch = first
    while epoch < planned:  # ``planned`` may be cut after the first epoch (time budget)
        t0 = time.time()
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        batch_task = progress.add_task(f"{label}epoch {epoch + 1}", total=steps_per_epoch, info="")
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(config, epoch * steps_per_epoch + step, planned * steps_per_epoch)
            logits, _ = model(augment(x_train[idx], gen, config.augment_strength))
            target = y_train[idx] * (1.0 - config.label_smoothing) + 0.5 * config.label_smoothing
            loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            ema.update(model)
            total_loss += float(loss.detach()) * len(idx)
            progress.update(batch_task, advance=1, info=f"loss {float(loss.detach()):.3f}")
        progress.remove_task(batch_task)
        val_auc = auc_or_nan(y_val, predict_logits(ema.module, x_val))
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total_loss / len(x_train),
                "val_auc": val_auc,
                "seconds": time.time() - t0,
            }
        )
        progress.update(epochs_task, advance=1, info=f"val AUC {val_auc:.4f}")
        if not console.is_terminal:  # logs: one line per epoch
            h = history[-1]
            console.print(
                f"{label}epoch {h['epoch']}: loss {h['train_loss']:.4f} val AUC {val_auc:.4f} ({h['seconds']:.0f} s)"
            )
        if epoch == 0 and first == 0:
            per_epoch = (time.time() - started) / 60
            fit = max(1, int(budget_minutes / max(per_epoch, 1e-6)))
            if fit < planned:
                planned = fit
                progress.update(epochs_task, total=planned)
                console.print(f"[yellow]{label}time budget {budget_minutes:.1f} min: training {planned} epochs")
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "seed": seed,
                    "n_train": len(x_train),
                    "model": model.state_dict(),
                    "ema": ema.module.state_dict(),
                    "ema_steps": ema.steps,
                    "optimiser": optimiser.state_dict(),
                    "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "planned": planned,
                },
                tmp,
            )
            os.replace(tmp, checkpoint)
        epoch += 1
    progress.remove_task(epochs_task)
    # the exported model is the EMA at the end of the annealed schedule: selecting the epoch on the
    # internal validation AUC (saturated near 0.995) only fits its noise
    return {k: v.detach().clone() for k, v in ema.module.state_dict().items()}, history


def train(
    data: Path,
    config: TrainConfig,
    split_file: Path = SPLIT_FILE,
    console: Console | None = None,
    checkpoint_dir: Path | None = None,
) -> tuple[PneumoniaNet | PneumoniaEnsemble, dict]:
    """Fit, select on val AUC, calibrate on val. Returns (model with calibrated bias, checkpoint info)."""
    console = console or Console()
    started = time.time()
    load_start = os.getloadavg()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    source = load_training_data(Path(data))
    records = source.records
    automatic = False
    if Path(split_file).exists():
        split, automatic = split_for(source, load_split(split_file))
        if automatic:  # an export, or a folder the split file does not know: never rewrite that file
            from services.core.settings import CommonSettings

            split_file = (
                CommonSettings().data_dir / "model-staging" / "splits" / f"auto-{split['data_sha256'][:16]}.json"
            )
            split_file.parent.mkdir(parents=True, exist_ok=True)
            save_split(split, split_file)
            console.print(
                f"{'labeling export' if source.kind == 'export' else 'this folder'}: automatic patient-level split"
                f" ({split['counts']['train']['patients']} / {split['counts']['val']['patients']} /"
                f" {split['counts']['test']['patients']} patients), written to {split_file}"
            )
    else:
        split = make_split(records)
        save_split(split, split_file)
        console.print(f"wrote new split to {split_file}")
    parts = assign(records, split)
    train_recs, val_recs = parts["train"], parts["val"]
    n_external = 0
    if config.hold_out_external:
        from services.inference.tools.proxy import is_external

        n_external = sum(is_external(r.name) for r in train_recs + val_recs)
        train_recs = [r for r in train_recs if not is_external(r.name)]
        val_recs = [r for r in val_recs if not is_external(r.name)]
    if config.limit:
        rng = np.random.default_rng(config.seed)
        train_recs = [train_recs[i] for i in sorted(rng.permutation(len(train_recs))[: config.limit])]
        val_recs = [val_recs[i] for i in sorted(rng.permutation(len(val_recs))[: max(8, config.limit // 4)])]
    if not train_recs or not val_recs:
        raise ValueError("empty train or validation split")
    y_train = torch.tensor([source.target(r) for r in train_recs], dtype=torch.float32)  # soft: an export's
    y_val = np.array([r.label for r in val_recs])
    n_pos = float(y_train.sum())
    pos_weight = torch.tensor((len(train_recs) - n_pos) / max(n_pos, 1.0))

    with progress_bar(console) as progress:
        x_train = load_images(train_recs, config.input_size, progress)
        x_val = load_images(val_recs, config.input_size, progress)
        load_seconds = time.time() - started
        model = build_network(config.net)
        members = list(model.members) if isinstance(model, PneumoniaEnsemble) else [model]
        history: list[dict] = []
        for i, member in enumerate(members):
            remaining = config.max_minutes - (time.time() - started) / 60
            budget = remaining / (len(members) - i)  # each member its share of what is left
            state, member_history = fit_member(
                member,
                config,
                config.seed + i,
                budget,
                x_train,
                y_train,
                x_val,
                y_val,
                pos_weight,
                member_checkpoint(checkpoint_dir, i) if checkpoint_dir else None,
                progress,
                console,
                label=f"member {i + 1}/{len(members)} " if len(members) > 1 else "",
            )
            member.load_state_dict(state)
            history += [{**h, "member": i + 1} for h in member_history]
        best_epoch = history[-1]["epoch"]
        resumed_seconds = sum(h["seconds"] for h in history if h.get("resumed"))
    model.eval()
    val_logits = predict_logits(model, x_val)
    a, b = fit_platt(val_logits, y_val)
    if a <= 0:  # degenerate (tiny smoke runs): keep the raw logits
        a, b = 1.0, 0.0
    # Platt's offset carries the validation prevalence (~74 % pneumonia, like training): move it to
    # the documented prior, so the probability does not depend on the training folder's class mix
    val_prevalence = float(np.clip(np.mean(y_val), 0.01, 0.99))
    prior_shift = math.log(config.calibration_prior / (1 - config.calibration_prior)) - math.log(
        val_prevalence / (1 - val_prevalence)
    )
    b += prior_shift
    model.shift_logit(b / a)
    temperature = 1.0 / a
    calibrated = sigmoid((val_logits + b / a) / temperature)
    val_auc = auc_or_nan(y_val, val_logits)
    info = {
        "train_config": {k: v for k, v in vars(config).items() if k != "net"},
        "net": config.net.to_dict(),
        "calibration": {
            "method": "temperature",
            "temperature": temperature,
            "fitted_on": "val",
            "platt_a": a,
            "platt_b": b,
            "bias_shift_folded_into_head": b / a,
            "prior": config.calibration_prior,
            "val_prevalence": val_prevalence,
            "prior_shift": prior_shift,
        },
        "thresholds": choose_thresholds(calibrated, y_val, operating_sensitivity=config.operating_sensitivity),
        "n_external_held_out": n_external,
        "history": history,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        # epochs an earlier, interrupted run trained count too (their own seconds; not its image loading)
        "train_seconds": round(time.time() - started + resumed_seconds, 1),
        "resumed_epoch_seconds": round(resumed_seconds, 1),
        "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
        "load_seconds": round(load_seconds, 1),
        "data_sha256": split["data_sha256"],
        "split_seed": split["seed"],
        "data_kind": source.kind,  # folder | export (soft labels)
        "split_file": str(split_file),
        "split_automatic": automatic,
        "n_train": len(train_recs),
        "n_val": len(val_recs),
        "pos_weight": float(pos_weight),
        "val": {
            "auc": val_auc,
            "log_loss_uncalibrated": log_loss(sigmoid(val_logits), y_val),
            "log_loss_calibrated": log_loss(calibrated, y_val),
        },
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "torch_version": torch.__version__,
        "threads": config.threads,
    }
    return model, info


def save_checkpoint(model: PneumoniaNet | PneumoniaEnsemble, info: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)


def load_checkpoint(path: Path) -> tuple[PneumoniaNet | PneumoniaEnsemble, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    info = ckpt["info"]
    model = build_network(NetConfig.from_dict(info["net"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, info
