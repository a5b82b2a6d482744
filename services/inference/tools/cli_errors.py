"""A user's mistake in a `pneumotriage model ...` command ends in one clear line and exit 2, never a
traceback: a bad path, a folder without NORMAL/ and PNEUMONIA/ images, a corrupt ONNX or
metadata.json, a model whose input size is not what its metadata says, a file that is not a
checkpoint, PyTorch missing (the optional `train` extra)."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console

TORCH_HINT = (
    "this command needs PyTorch, which is the optional `train` extra: "
    "install it with `.venv/bin/pip install -e '.[train]'` (CPU wheels; serving never needs it)"
)

console = Console(stderr=True)
P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str) -> NoReturn:
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user's input causes into `fail(...)`; anything else stays a bug's traceback."""
    from PIL import UnidentifiedImageError
    from pydicom.errors import InvalidDicomError

    from services.inference.deploy import DeployError

    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "torch":
            fail(TORCH_HINT)
        raise
    except DeployError as exc:
        fail(str(exc))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        fail(f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc))
    except (UnidentifiedImageError, InvalidDicomError) as exc:
        fail(f"an image does not decode: {exc}")
    except json.JSONDecodeError as exc:
        fail(f"not valid JSON: {exc}")
    except (ValueError, KeyError) as exc:
        fail(f"{type(exc).__name__}: {exc}")


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "torch":
            fail(TORCH_HINT)
        raise


def require_model_dir(path: Path) -> Path:
    """A version directory whose ONNX loads and runs at its metadata's input size."""
    from services.inference.deploy import DeployError, check_model_dir

    try:
        check_model_dir(Path(path))
    except DeployError as exc:
        fail(str(exc))
    return Path(path)


def active_model_dir(repository: Path, name: str = "pneumonia") -> Path:
    """The version the live repository serves (pinned, else newest)."""
    from services.inference.deploy import active_version

    version = active_version(repository, name)
    if version is None:
        fail(f"no model version under {Path(repository) / name}: give --model-dir")
    return Path(repository) / name / str(version)


def load_checkpoint_or_fail(path: Path):  # -> (PneumoniaNet, dict)
    require_torch()
    from services.inference.tools.training.train import load_checkpoint

    if not Path(path).is_file():
        fail(f"no checkpoint at {path} (`model train --checkpoint` writes one)")
    try:
        return load_checkpoint(path)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors for a foreign file
        fail(f"{path} is not a checkpoint written by `model train`: {type(exc).__name__}: {str(exc)[:200]}")


def user_errors_command(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of `user_errors` for a Typer command (its signature is kept for Typer)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with user_errors():
            return func(*args, **kwargs)

    return wrapper
