"""`pneumotriage model adapt`: fine-tune a base version on a site's labelled images into a staged candidate.

1. Sources, in order of authority (the first one that holds an image wins: list clinician-confirmed
   folders before crowd exports): folders NORMAL/ PNEUMONIA/ and labeling exports (crowd labels
   below `min_confidence` are dropped: a wrong hard label costs more than a missing one).
2. The site's locked test set (services/inference/tools/site_loop.py) is carved first, or reused.
3. Guard: too few labels per class (training pool or locked set) is refused.
4. The base version's ONNX weights are read back into the network (batch norm folded into the
   convolutions: fine-tuned with those statistics frozen) and fine-tuned on the whole pool. The
   site calibration (Platt) and the operating threshold are fitted on **out-of-fold** logits:
   `calibration_folds` patient-level folds of the pool, each scored by a copy fine-tuned without it
   (cross-fitting; fine-tuning takes seconds). Before, a quarter of the pool was held out for it:
   with 100 site labels the threshold came from ~10 pneumonias, and on bench/site_adapt.py the
   candidate's sensitivity at it was 0.85 on average (worst draw 0.78) against the 0.95 target.
   Exported to the staging area (`model export`'s export_version, checked against PyTorch).
5. The candidate and the base version are scored on the locked set: metadata.json gets both, with
   bootstrap CIs and the paired differences, and the lineage (base, sources with hashes and counts,
   recipe, seed, wall time).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from services.inference.tools import site_loop
from services.inference.tools.training.dataset import ImageRecord


class NotEnoughLabels(ValueError):
    """The guard: too few labels of a class to adapt (or to judge the result)."""


@dataclass
class AdaptRecipe:
    epochs: int = 4
    lr: float = 3e-4
    batch_size: int = 16
    seed: int = 1234
    threads: int = 2
    locked_fraction: float = 0.3
    calibration_folds: int = 4
    min_per_class: int = 20
    min_locked_per_class: int = 10
    min_confidence: float = 0.8
    augment_strength: float = 0.5
    operating_sensitivity: float = 0.95
    # the operating threshold keeps operating_sensitivity with this confidence (distribution-free,
    # from the out-of-fold pneumonias: services/core/calibration.py threshold_for_sensitivity); 0: the
    # sample's own 95 % point
    operating_confidence: float = 0.8
    bootstrap: int = 500


def net_from_onnx(version_dir: Path):  # -> PneumoniaNet | PneumoniaEnsemble
    """The base version's network (one, or an ensemble's members), weights read from its model.onnx
    (BN folded: identity BN + bias)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from services.inference.tools.training.network import NetConfig, PneumoniaEnsemble, build_network

    meta = json.loads((version_dir / "metadata.json").read_text())
    net = build_network(NetConfig.from_dict(meta.get("training", {}).get("net") or NetConfig().to_dict()))
    members = list(net.members) if isinstance(net, PneumoniaEnsemble) else [net]
    prefixes = [f"model.members.{i}." for i in range(len(members))] if len(members) > 1 else ["model."]
    graph = onnx.load(str(version_dir / "model.onnx")).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]  # in execution order: member after member
    modules = [m for member in members for m in member.features.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for member in members for m in member.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if len(convs) != len(modules) or len(bns) != len(modules):
        raise ValueError(f"{version_dir}: the ONNX graph does not match the network in its metadata")
    with torch.no_grad():
        for node, conv, bn in zip(convs, modules, bns, strict=True):
            conv.weight.copy_(torch.from_numpy(init[node.input[1]].copy()))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(init[node.input[2]].copy()))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        for member, prefix in zip(members, prefixes, strict=True):
            member.head.weight.copy_(torch.from_numpy(init[f"{prefix}head.weight"].copy()))
            member.head.bias.copy_(torch.from_numpy(init[f"{prefix}head.bias"].copy()))
    net.eval()
    return net, meta


def _sources(sources: list[Path], min_confidence: float) -> tuple[list[ImageRecord], dict, list[dict]]:
    from services.inference.tools.training.sources import load_training_data
    from services.inference.tools.training.split import dataset_sha256

    seen: set[str] = set()
    records: list[ImageRecord] = []
    soft: dict = {}
    lineage = []
    for src in sources:
        data = load_training_data(src, min_confidence=min_confidence)
        fresh = [r for r in data.records if r.sha256 not in seen]
        seen.update(r.sha256 for r in fresh)
        records += fresh
        soft.update({r.path: data.soft[r.path] for r in fresh if r.path in data.soft})
        lineage.append(
            {
                "path": str(Path(src).resolve()),
                "kind": data.kind,
                "sha256": dataset_sha256(data.records),
                "images": len(data.records),
                "used": len(fresh),
                "outranked": len(data.records) - len(fresh),
                "NORMAL": sum(r.label == 0 for r in fresh),
                "PNEUMONIA": sum(r.label == 1 for r in fresh),
                "crowd_min_confidence": min_confidence if data.kind == "export" else None,
            }
        )
    return records, soft, lineage


def patient_folds(records: list[ImageRecord], k: int, seed: int) -> list[np.ndarray]:
    """k folds of record indices, whole patients each, patients of each class dealt round-robin."""
    rng = np.random.default_rng(seed)
    by_patient: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_patient.setdefault(r.patient, []).append(i)
    folds: list[list[int]] = [[] for _ in range(k)]
    turn = 0
    for label in (0, 1):
        patients = sorted(p for p, idx in by_patient.items() if records[idx[0]].label == label)
        for j in rng.permutation(len(patients)):
            folds[turn % k] += by_patient[patients[j]]
            turn += 1
    return [np.array(sorted(f), dtype=np.int64) for f in folds if f]


def site_thresholds(calibrated: np.ndarray, labels: np.ndarray, recipe: AdaptRecipe) -> dict[str, float]:
    """rule_out / urgent as `model train` chooses them; the operating threshold keeps the target
    sensitivity with `operating_confidence` (out-of-fold, bench/site_adapt.py: the sample's own 95 %
    point gave 0.92-0.95 on held-back site images)."""
    from services.core.calibration import choose_thresholds, threshold_for_sensitivity

    t = choose_thresholds(calibrated, labels, operating_sensitivity=recipe.operating_sensitivity)
    operating = threshold_for_sensitivity(labels, calibrated, recipe.operating_sensitivity, recipe.operating_confidence)
    return {
        "rule_out": min(t["rule_out"], operating),
        "operating": operating,
        "urgent": max(t["urgent"], operating),
    }


def _pos_weight(targets) -> float:  # torch.Tensor of (soft) labels
    n_pos = float(targets.sum())
    return (len(targets) - n_pos) / max(n_pos, 1.0)


def _fine_tune(net, x, targets, recipe: AdaptRecipe, seed: int, console: Console | None = None) -> list[dict]:
    """Fine-tune `net` in place on images x (N, 1, H, W) and (soft) targets; the per-epoch history."""
    import torch
    import torch.nn.functional as F

    from services.inference.tools.training.train import augment

    pos_weight = torch.tensor(_pos_weight(targets))
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    history = []
    steps = math.ceil(len(targets) / recipe.batch_size)
    for epoch in range(recipe.epochs):
        t0 = time.time()
        net.train()
        for m in net.modules():  # the folded statistics stay frozen (few site images per batch)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        order = torch.randperm(len(targets), generator=gen)
        total = 0.0
        for step in range(steps):
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            logits, _ = net(augment(x[idx], gen, recipe.augment_strength))
            loss = F.binary_cross_entropy_with_logits(logits, targets[idx], pos_weight=pos_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        net.eval()
        history.append({"epoch": epoch + 1, "train_loss": total / len(targets), "seconds": time.time() - t0})
        if console is not None:
            console.print(f"epoch {epoch + 1}: loss {history[-1]['train_loss']:.4f} ({history[-1]['seconds']:.0f} s)")
    return history


def adapt(
    sources: list[Path],
    base_dir: Path,
    out: Path,
    site: str,
    recipe: AdaptRecipe | None = None,
    version: int | None = None,
    console: Console | None = None,
) -> Path:
    import torch

    from services.core.calibration import fit_platt, sigmoid
    from services.inference.tools.training.export import export_version
    from services.inference.tools.training.train import git_commit, git_dirty, load_images, predict_logits

    recipe = recipe or AdaptRecipe()
    console = console or Console()
    started = time.time()
    records, soft, lineage = _sources(sources, recipe.min_confidence)
    locked, created = site_loop.load_or_carve(site, records, recipe.locked_fraction, recipe.seed)
    pool, _ = site_loop.split_locked(locked, records)
    locked_recs = site_loop.locked_records(locked)
    counts = {c: sum(r.label == i for r in pool) for i, c in enumerate(("NORMAL", "PNEUMONIA"))}
    short = [c for c, n in counts.items() if n < recipe.min_per_class]
    short_locked = [c for c, n in locked["counts"].items() if n < recipe.min_locked_per_class]
    if short or short_locked:
        raise NotEnoughLabels(
            f"too few site labels: training pool {counts} (at least {recipe.min_per_class} per class needed),"
            f" locked test set {locked['counts']} (at least {recipe.min_locked_per_class} per class)"
        )
    console.print(
        f"site {site}: locked test set {'carved' if created else 'reused'} ({len(locked_recs)} images,"
        f" {locked['counts']}); training pool {len(pool)} images {counts}"
    )
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    net, base_meta = net_from_onnx(base_dir)
    size = int(base_meta["input_size"])
    x_pool = load_images(pool, size)
    y_pool = np.array([r.label for r in pool])
    targets = torch.tensor([soft.get(r.path, float(r.label)) for r in pool], dtype=torch.float32)

    # out-of-fold logits for the site calibration and the threshold (cross-fitting)
    folds = patient_folds(pool, max(2, recipe.calibration_folds), recipe.seed + 1)
    oof = np.zeros(len(pool), dtype=np.float64)
    for k, held in enumerate(folds):
        train = np.setdiff1d(np.arange(len(pool)), held)
        fold_net, _ = net_from_onnx(base_dir)
        _fine_tune(fold_net, x_pool[train], targets[train], recipe, seed=recipe.seed + 10 + k)
        oof[held] = predict_logits(fold_net, x_pool[held])
        console.print(f"calibration fold {k + 1}/{len(folds)}: {len(held)} images scored out of fold")
    history = _fine_tune(net, x_pool, targets, recipe, seed=recipe.seed, console=console)
    a, b = fit_platt(oof, y_pool)
    if a <= 0:
        a, b = 1.0, 0.0
    net.shift_logit(b / a)
    calibrated = sigmoid((oof + b / a) * a)
    info = {
        "train_config": {**asdict(recipe), "input_size": size},
        "net": base_meta.get("training", {}).get("net") or {},
        "calibration": {
            "method": "temperature",
            "temperature": 1.0 / a,
            "fitted_on": f"out-of-fold logits of the site pool ({len(folds)} patient folds)",
            "platt_a": a,
            "platt_b": b,
            "bias_shift_folded_into_head": b / a,
        },
        "thresholds": site_thresholds(calibrated, y_pool, recipe),
        "train_seconds": round(time.time() - started, 1),
        "data_sha256": lineage[0]["sha256"] if len(lineage) == 1 else "+".join(s["sha256"][:16] for s in lineage),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "val": {"auc": site_loop._auc(y_pool, calibrated), "n": len(pool)},  # out of fold
        "best_epoch": recipe.epochs,
        "n_train": len(pool),
        "n_val": len(pool),
        "pos_weight": _pos_weight(targets),
        "split_seed": recipe.seed,
        "threads": recipe.threads,
        "torch_version": torch.__version__,
        "history": history,
        "load_seconds": 0.0,
    }
    vdir = export_version(net, info, out, [r.path for r in pool[:8]], version)
    # the evidence: candidate and base on the locked set, same images, paired
    y = np.array([r.label for r in locked_recs])
    groups = [r.patient for r in locked_recs]
    cand, base = site_loop.score(vdir, locked_recs), site_loop.score(base_dir, locked_recs)
    comparison = site_loop.paired_comparison(y, groups, cand, base, n=recipe.bootstrap, seed=recipe.seed)
    meta = json.loads((vdir / "metadata.json").read_text())
    meta["site_adaptation"] = {
        "site": site,
        "base_version": str(base_meta.get("version", base_dir.name)),
        "base_dir": str(base_dir.resolve()),
        "sources": lineage,
        "recipe": asdict(recipe),
        "seed": recipe.seed,
        "wall_seconds": round(time.time() - started, 1),
        "n_fine_tune": len(pool),
        "n_calibration": len(pool),  # the same images, scored out of fold
        "calibration_folds": len(folds),
        "locked_test_set": {"file": "locked_test_set.json", "carved_now": created, **locked["counts"]},
    }
    meta["metrics"]["locked_site_test"] = comparison
    (vdir / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    (vdir / "locked_test_set.json").write_text(json.dumps(locked, indent=1) + "\n")
    return vdir
