"""`pneumotriage model deploy`: add a model version to the Triton repository and make Triton serve it.

Roll forward: `deploy --model-dir DIR` copies DIR's model.onnx + metadata.json into
<repository>/<model>/<next version>/ (atomically: copied aside, then renamed), pins that version in
config.pbtxt (`version_policy: { specific: { versions: [N] } }`) and asks Triton (explicit model
control) to load the model, which swaps versions without dropping requests. Roll back:
`deploy --version N` re-pins an existing version and reloads. The pin lives in config.pbtxt, so a
Triton restart (or the embedded onnxruntime runtime at its next start) serves the same version.
Every prediction records the version that actually answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.inference.repository import list_versions, next_version, parse_config, read_version_policy
from services.inference.triton_python import MODEL_PY

REQUIRED_FILES = ("model.onnx", "metadata.json")


class DeployError(Exception):
    pass


@dataclass
class DeployResult:
    model: str
    version: int
    previous: int | None
    copied: bool
    loaded_in_triton: bool
    ready_versions: list[str]


# -- config.pbtxt version policy -------------------------------------------------------------


def config_backend(text: str) -> str:
    config = parse_config(text)
    return config.backend or config.platform


def _find_top_level_field(text: str, field_name: str) -> tuple[int, int] | None:
    """(start, end) of a top-level `field_name [:] { ... }` entry, skipping comments and strings."""
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if ch in "\"'":
            end = text.find(ch, i + 1)
            i = n if end < 0 else end + 1
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif (
            depth == 0
            and text.startswith(field_name, i)
            and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"))
        ):
            j = i + len(field_name)
            while j < n and text[j] in " \t\r\n:":
                j += 1
            if j < n and text[j] == "{":
                level, k = 0, j
                while k < n:
                    if text[k] == "{":
                        level += 1
                    elif text[k] == "}":
                        level -= 1
                        if level == 0:
                            return i, k + 1
                    k += 1
                raise DeployError(f"unbalanced braces after {field_name} in config.pbtxt")
        i += 1
    return None


def set_version_policy(text: str, version: int | None) -> str:
    """config.pbtxt text with its version_policy replaced by `specific [version]` (None: latest 1).

    Edits only that entry (comments and layout elsewhere are kept) and checks the result parses."""
    policy = (
        f"version_policy: {{ specific: {{ versions: [ {int(version)} ] }} }}"
        if version is not None
        else "version_policy: { latest: { num_versions: 1 } }"
    )
    span = _find_top_level_field(text, "version_policy")
    if span is None:
        new = text.rstrip("\n") + "\n" + policy + "\n"
    else:
        new = text[: span[0]] + policy + text[span[1] :]
    parsed = read_version_policy(new)
    if parsed != ([int(version)] if version is not None else []):
        raise DeployError(f"could not set the version policy (got {parsed})")
    return new


# -- the repository --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_model_dir(model_dir: Path, expected_input_size: int | None = None) -> dict:
    """Validate an exported version: files present, ONNX runs with the agreed I/O; returns metadata."""
    import onnxruntime as ort

    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise DeployError(f"{model_dir} lacks {', '.join(missing)} (expected the output of `model export`)")
    meta = json.loads((model_dir / "metadata.json").read_text())
    from services.inference.runtime import Calibration

    Calibration.from_metadata(meta.get("calibration"))  # raises on a malformed calibration
    size = int(meta["input_size"])
    if expected_input_size and size != expected_input_size:
        raise DeployError(f"input_size {size} differs from the repository's config.pbtxt ({expected_input_size})")
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != ["image"] or not {"logit", "cam"} <= set(outputs):
        raise DeployError(f"ONNX I/O must be image -> logit, cam; got {inputs} -> {outputs}")
    logit, cam = session.run(["logit", "cam"], {"image": np.zeros((2, 1, size, size), np.float32)})
    if np.asarray(logit).reshape(-1).shape != (2,) or np.asarray(cam).ndim != 3:
        raise DeployError(f"unexpected output shapes: logit {np.shape(logit)}, cam {np.shape(cam)}")
    return meta


def _config_input_size(text: str) -> int | None:
    config = parse_config(text)
    for inp in config.input:
        if inp.name == "image" and inp.dims:
            return int(inp.dims[-1])
    return None


def add_version(repository: Path, name: str, model_dir: Path, version: int | None = None) -> tuple[int, bool]:
    """Copy model_dir into the repository as `version` (default: next free). Returns (version, copied)."""
    model_root = repository / name
    config_path = model_root / "config.pbtxt"
    if not config_path.exists():
        raise DeployError(f"{config_path} does not exist: create the repository with `model export` first")
    config_text = config_path.read_text()
    meta = check_model_dir(model_dir, _config_input_size(config_text))
    version = version or next_version(model_root)
    target = model_root / str(version)
    python_backend = config_backend(config_text) == "python"
    if target.exists():
        same = all((target / f).exists() and _sha256(target / f) == _sha256(model_dir / f) for f in ("model.onnx",))
        if not same:
            raise DeployError(f"version {version} already exists with a different model.onnx; pick another version")
        if python_backend and not (target / "model.py").exists():
            shutil.copy2(MODEL_PY, target / "model.py")
        return version, False
    staging = Path(tempfile.mkdtemp(prefix=f".deploy-{version}-", dir=model_root))
    try:
        shutil.copy2(model_dir / "model.onnx", staging / "model.onnx")
        meta["version"] = str(version)
        meta.setdefault("name", name)
        meta["deployed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta["deployed_from"] = str(model_dir.resolve())
        (staging / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
        if python_backend:
            shutil.copy2(MODEL_PY, staging / "model.py")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version, True


def pin_version(repository: Path, name: str, version: int) -> int | None:
    """Pin `version` in config.pbtxt; returns the version pinned (or latest) before."""
    config_path = repository / name / "config.pbtxt"
    text = config_path.read_text()
    before = read_version_policy(text)
    previous = max(before) if before else max(list_versions(repository / name), default=None)
    if not (repository / name / str(version) / "model.onnx").exists():
        have = list_versions(repository / name)
        raise DeployError(f"version {version} of {name} is not in {repository} ({have})")
    new = set_version_policy(text, version)
    tmp = config_path.with_name(".config.pbtxt.tmp")
    tmp.write_text(new)
    tmp.replace(config_path)
    return previous


async def load_in_triton(url: str, name: str, version: int, timeout_s: float = 120.0) -> list[str]:
    """Ask Triton to (re)load the model and wait until exactly that version is ready."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        await client.load_model(name, client_timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            if await client.is_model_ready(name, str(version), client_timeout=5):
                break
            if time.monotonic() > deadline:
                raise DeployError(f"Triton did not make {name} version {version} ready in {timeout_s}s")
            await asyncio.sleep(0.2)
        index = await client.get_model_repository_index(as_json=True, client_timeout=10)
        return sorted(
            str(m.get("version"))
            for m in index.get("models", [])
            if m.get("name") == name and m.get("state") == "READY"
        )
    finally:
        await client.close()


async def deploy_async(
    repository: Path,
    name: str = "pneumonia",
    model_dir: Path | None = None,
    version: int | None = None,
    triton_url: str | None = None,
    timeout_s: float = 120.0,
) -> DeployResult:
    """Roll forward (model_dir given) or to an existing version (only version given)."""
    repository = Path(repository)
    if model_dir is None and version is None:
        raise DeployError("give --model-dir (a new version) and/or --version (an existing one to roll to)")
    copied = False
    if model_dir is not None:
        version, copied = add_version(repository, name, Path(model_dir), version)
    assert version is not None
    previous = pin_version(repository, name, version)
    ready: list[str] = []
    if triton_url:
        ready = await load_in_triton(triton_url, name, version, timeout_s)
    return DeployResult(name, version, previous, copied, bool(triton_url), ready)


def deploy(
    repository: Path,
    name: str = "pneumonia",
    model_dir: Path | None = None,
    version: int | None = None,
    triton_url: str | None = None,
    timeout_s: float = 120.0,
) -> DeployResult:
    return asyncio.run(deploy_async(repository, name, model_dir, version, triton_url, timeout_s))
