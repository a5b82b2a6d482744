"""`pneumotriage model deploy`: the only way a model version becomes active in the live repository.

Roll forward (`deploy --model-dir DIR`, DIR = a version `model train` / `model export` staged):
1. check DIR (files present, calibration well-formed, the ONNX loads and runs with the agreed I/O
   and the repository's input size);
2. the quality gate (services/inference/tools/deploy_gate.py, when given): the candidate and the
   active version on one fixed reference set; refused with the figures when the candidate is worse
   by more than the documented margins, unless forced with a reason;
3. copy DIR in as the next version (copied aside, then renamed: never half-written), with the gate's
   figures, its lineage and the drift reference written into the copy;
4. make the runtime load it: Triton (explicit model control) is asked to load the model with the
   new pin passed as a configuration override, and must report exactly that version ready; without
   Triton, the service's own onnxruntime runtime loads it and answers a batch;
5. only then pin it in config.pbtxt (`version_policy: { specific: { versions: [N] } }`).
Any failure before step 5 leaves config.pbtxt and the version directories as they were (a copied
version is removed again). Roll back / forward to an existing version (`deploy --version N`):
steps 4 and 5. Every attempt, refused and failed ones too, is appended to
`<repository>/<model>/deployments.jsonl` (the registry `model list` / `model status` read).

The pin lives in config.pbtxt, so a Triton restart (or the embedded runtime at its next start)
serves the same version. Every prediction records the version that actually answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import getpass
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.inference.repository import list_versions, next_version, parse_config, read_version_policy
from services.inference.triton_python import MODEL_PY

REQUIRED_FILES = ("model.onnx", "metadata.json")


REGISTRY_FILE = "deployments.jsonl"


class DeployError(Exception):
    """The request or the files cannot be deployed (a user's mistake): nothing was changed."""


class RuntimeLoadError(DeployError):
    """The runtime (Triton or embedded onnxruntime) did not load the version: nothing was changed."""


class QualityGateRefused(DeployError):
    """The candidate is worse than the active version by more than the margins: nothing was changed."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class QualityGate(Protocol):
    """Judges a candidate version directory against the active one (None: no active version)."""

    def judge(self, candidate: Path, active: Path | None) -> dict[str, Any]:
        """A report with at least "passed" (bool), "reasons" (list[str]) and, when the candidate's
        reference predictions are enough for one, "drift_reference" (a DriftReference)."""
        ...


@dataclass
class DeployResult:
    model: str
    version: int
    previous: int | None
    copied: bool
    loaded_in_triton: bool
    ready_versions: list[str]
    quality: dict[str, Any] | None = None
    forced: bool = False
    drift_reference: bool = False
    notes: list[str] = field(default_factory=list)


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
    """Validate an exported version: files present, ONNX runs with the agreed I/O; returns metadata.

    Every problem is a DeployError with a message that names the file (never a traceback)."""
    import onnxruntime as ort

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DeployError(f"{model_dir} is not a directory (expected a version `model export` staged)")
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise DeployError(f"{model_dir} lacks {', '.join(missing)} (expected the output of `model export`)")
    try:
        meta = json.loads((model_dir / "metadata.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        from services.inference.runtime import Calibration

        Calibration.from_metadata(meta.get("calibration"))  # raises on a malformed calibration
        size = int(meta["input_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DeployError(f"{model_dir / 'metadata.json'} is not a usable model description: {exc!r}") from exc
    if expected_input_size and size != expected_input_size:
        raise DeployError(f"input_size {size} differs from the repository's config.pbtxt ({expected_input_size})")
    try:
        session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a corrupt graph
        raise DeployError(f"{model_dir / 'model.onnx'} is not a loadable ONNX model: {str(exc)[:300]}") from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != ["image"] or not {"logit", "cam"} <= set(outputs):
        raise DeployError(f"ONNX I/O must be image -> logit, cam; got {inputs} -> {outputs}")
    try:
        logit, cam = session.run(["logit", "cam"], {"image": np.zeros((2, 1, size, size), np.float32)})
    except Exception as exc:
        raise DeployError(
            f"{model_dir / 'model.onnx'} does not run on a {size} px batch (metadata input_size {size}): "
            f"{str(exc)[:300]}"
        ) from exc
    if np.asarray(logit).reshape(-1).shape != (2,) or np.asarray(cam).ndim != 3:
        raise DeployError(f"unexpected output shapes: logit {np.shape(logit)}, cam {np.shape(cam)}")
    return meta


def _config_input_size(text: str) -> int | None:
    config = parse_config(text)
    for inp in config.input:
        if inp.name == "image" and inp.dims:
            return int(inp.dims[-1])
    return None


def add_version(
    repository: Path,
    name: str,
    model_dir: Path,
    version: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> tuple[int, bool]:
    """Copy model_dir into the repository as `version` (default: next free). Returns (version, copied).

    ``extra_metadata`` is merged into the copy's metadata.json, ``files`` (name -> text) are written
    beside it, both before the rename: the version appears complete or not at all."""
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
        meta.update(extra_metadata or {})
        (staging / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
        for file_name, text in (files or {}).items():
            (staging / file_name).write_text(text)
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


def active_version(repository: Path, name: str) -> int | None:
    """The version the repository serves now: the pinned one, else the newest (None: no version).
    The same rule as the embedded runtime's `ModelRepository.resolve`."""
    model_root = Path(repository) / name
    available = list_versions(model_root)
    config_path = model_root / "config.pbtxt"
    pinned = [v for v in read_version_policy(config_path.read_text()) if v in available] if config_path.exists() else []
    if pinned:
        return max(pinned)
    return max(available, default=None)


# -- the runtimes ----------------------------------------------------------------------------


def pinned_config_json(config_text: str, version: int) -> str:
    """config.pbtxt with `version` pinned, as the JSON Triton's load-with-override accepts."""
    from google.protobuf import json_format

    return json_format.MessageToJson(
        parse_config(set_version_policy(config_text, version)), preserving_proto_field_name=True
    )


async def load_in_triton(
    url: str, name: str, version: int, timeout_s: float = 120.0, config_json: str | None = None
) -> list[str]:
    """Ask Triton to (re)load the model (with ``config_json`` as its configuration when given) and
    wait until exactly that version is ready. Every failure is a RuntimeLoadError."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        try:
            await client.load_model(name, config=config_json, client_timeout=timeout_s)
            deadline = time.monotonic() + timeout_s
            while not await client.is_model_ready(name, str(version), client_timeout=5):
                if time.monotonic() > deadline:
                    raise RuntimeLoadError(f"Triton did not make {name} version {version} ready in {timeout_s}s")
                await asyncio.sleep(0.2)  # polling interval of the readiness check
            index = await client.get_model_repository_index(as_json=True, client_timeout=10)
        except (TimeoutError, InferenceServerException, OSError) as exc:
            text = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
            raise RuntimeLoadError(f"Triton at {url} did not load {name} version {version}: {text}") from exc
        return sorted(
            str(m.get("version"))
            for m in index.get("models", [])
            if m.get("name") == name and m.get("state") == "READY"
        )
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def load_embedded(repository: Path, name: str, version: int) -> None:
    """Load the version with the service's own embedded runtime and run one batch through it."""
    from services.inference.runtime import ModelRepository, OnnxRuntime

    runtime = OnnxRuntime(ModelRepository(repository, name), version=str(version), threads=1)
    try:
        runtime.load()
        size = runtime.input_size
        out = runtime.run_sync(np.zeros((1, 1, size, size), np.float32))
        if out.model_version != str(version) or not np.all(np.isfinite(out.logits)):
            raise RuntimeLoadError(f"the embedded runtime answered with version {out.model_version}: {out.logits}")
    except RuntimeLoadError:
        raise
    except Exception as exc:
        raise RuntimeLoadError(f"the embedded runtime did not load {name} version {version}: {exc}") from exc
    finally:
        runtime._executor.shutdown(wait=False)


# -- the registry ----------------------------------------------------------------------------


def registry_path(repository: Path, name: str) -> Path:
    return Path(repository) / name / REGISTRY_FILE


def record(repository: Path, name: str, entry: dict[str, Any]) -> None:
    """Append one deploy attempt to the registry (JSON lines, one per attempt, never rewritten)."""
    path = registry_path(repository, name)
    if not path.parent.is_dir():
        return
    line = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": _user(), "model": name, **entry}
    with open(path, "a") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
        fh.flush()


def read_registry(repository: Path, name: str) -> list[dict[str, Any]]:
    path = registry_path(repository, name)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@contextlib.contextmanager
def _deploy_lock(repository: Path, name: str) -> Iterator[None]:
    """One deploy at a time per model repository (an advisory lock beside config.pbtxt)."""
    path = Path(repository) / name / ".deploy.lock"
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DeployError(f"another deploy of {name} is running ({path} is locked)") from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- deploy ----------------------------------------------------------------------------------


async def deploy_async(
    repository: Path,
    name: str = "pneumonia",
    model_dir: Path | None = None,
    version: int | None = None,
    triton_url: str | None = None,
    timeout_s: float = 120.0,
    gate: QualityGate | None = None,
    force_reason: str | None = None,
    say: Callable[[str], None] | None = None,
) -> DeployResult:
    """Roll forward (model_dir given) or to an existing version (only version given). Nothing in the
    repository changes unless the runtime loaded the version (see the module docstring)."""
    repository = Path(repository)
    say = say or (lambda _text: None)
    if model_dir is None and version is None:
        raise DeployError("give --model-dir (a new version) and/or --version (an existing one to roll to)")
    model_root = repository / name
    config_path = model_root / "config.pbtxt"
    if not config_path.exists():
        raise DeployError(f"{config_path} does not exist: create the repository with `model export` first")
    with _deploy_lock(repository, name):
        return await _deploy_locked(
            repository, name, model_dir, version, triton_url, timeout_s, gate, force_reason, say
        )


async def _deploy_locked(
    repository: Path,
    name: str,
    model_dir: Path | None,
    version: int | None,
    triton_url: str | None,
    timeout_s: float,
    gate: QualityGate | None,
    force_reason: str | None,
    say: Callable[[str], None],
) -> DeployResult:
    model_root = repository / name
    config_path = model_root / "config.pbtxt"
    config_text = config_path.read_text()
    previous = active_version(repository, name)
    runtime = f"triton {triton_url}" if triton_url else "embedded onnxruntime"
    entry: dict[str, Any] = {"previous": previous, "runtime": runtime}
    quality: dict[str, Any] | None = None
    copied, drift_written = False, False
    notes: list[str] = []
    try:
        if model_dir is not None:
            model_dir = Path(model_dir)
            entry.update(action="deploy", source=str(model_dir.resolve()))
            check_model_dir(model_dir, _config_input_size(config_text))
            entry["onnx_sha256"] = _sha256(model_dir / "model.onnx")
            files: dict[str, str] = {}
            extra: dict[str, Any] = {}
            version = version or next_version(model_root)
            entry["version"] = version
            existing = model_root / str(version) / "model.onnx"
            if existing.is_file() and _sha256(existing) != entry["onnx_sha256"]:
                raise DeployError(f"version {version} already exists with a different model.onnx; pick another version")
            if gate is not None:
                active_dir = model_root / str(previous) if previous is not None else None
                say(f"quality gate: candidate {model_dir} against " + (f"version {previous}" if active_dir else "none"))
                quality = gate.judge(model_dir, active_dir)
                reference = quality.pop("drift_reference", None)
                entry["quality"] = quality
                if not quality["passed"]:
                    if not force_reason:
                        raise QualityGateRefused("; ".join(quality["reasons"]), quality)
                    entry["forced"] = True
                    entry["reason"] = force_reason
                    notes.append("forced past the quality gate: " + "; ".join(quality["reasons"]))
                extra["quality_gate"] = {**quality, "forced": bool(entry.get("forced")), "reason": force_reason}
                if reference is not None:
                    from services.core.drift import REFERENCE_FILE

                    reference = dataclasses.replace(reference, model_name=name, model_version=str(version))
                    files[REFERENCE_FILE] = json.dumps(reference.to_dict(), indent=1) + "\n"
                    drift_written = True
                else:
                    notes.append("no drift reference written (reference set too small): run `model drift-reference`")
            version, copied = add_version(repository, name, model_dir, version, extra, files)
        else:
            entry["action"] = "rollback" if previous is not None and version < previous else "activate"
            if not (model_root / str(version) / "model.onnx").is_file():
                have = list_versions(model_root)
                raise DeployError(f"version {version} of {name} is not in {repository} (have {have})")
            check_model_dir(model_root / str(version), _config_input_size(config_text))
            from services.core.drift import REFERENCE_FILE

            drift_written = (model_root / str(version) / REFERENCE_FILE).is_file()
            if not drift_written:
                notes.append(
                    f"version {version} has no drift reference: run `model drift-reference --version {version}`"
                )
        assert version is not None
        entry["version"] = version
        try:
            ready: list[str] = []
            if triton_url:
                say(f"asking Triton at {triton_url} to load {name} version {version}")
                ready = await load_in_triton(
                    triton_url, name, version, timeout_s, pinned_config_json(config_text, version)
                )
            else:
                say(f"loading {name} version {version} with the embedded runtime")
                await asyncio.get_running_loop().run_in_executor(None, load_embedded, repository, name, version)
            pin_version(repository, name, version)
        except BaseException:
            if copied:
                shutil.rmtree(model_root / str(version), ignore_errors=True)
            raise
    except DeployError as exc:
        outcome = "refused" if isinstance(exc, QualityGateRefused) else "failed"
        record(repository, name, {**entry, "outcome": outcome, "error": str(exc)})
        raise
    record(repository, name, {**entry, "outcome": "ok", "copied": copied, "drift_reference": drift_written})
    return DeployResult(
        name,
        version,
        previous,
        copied,
        bool(triton_url),
        ready,
        quality=quality,
        forced=bool(entry.get("forced")),
        drift_reference=drift_written,
        notes=notes,
    )


def deploy(
    repository: Path,
    name: str = "pneumonia",
    model_dir: Path | None = None,
    version: int | None = None,
    triton_url: str | None = None,
    timeout_s: float = 120.0,
    gate: QualityGate | None = None,
    force_reason: str | None = None,
    say: Callable[[str], None] | None = None,
) -> DeployResult:
    return asyncio.run(
        deploy_async(repository, name, model_dir, version, triton_url, timeout_s, gate, force_reason, say)
    )
