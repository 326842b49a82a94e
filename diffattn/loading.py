"""`load_pipeline`: a preset name, a local folder or a hub id, always through the pipeline's `from_pretrained`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .presets import PRESETS, preset_path


logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


DEVICE_ENV = "DIFFATTN_DEVICE"


def default_device() -> str:
    """The device diffattn's faces (CLI, UI, demo, batch jobs, trainers) run on when none is named: the
    DIFFATTN_DEVICE environment variable when set (e.g. "cpu" on a GPU machine), else "cuda" when torch sees a CUDA
    GPU, else "cpu". `load_pipeline` itself, like diffusers' `from_pretrained`, leaves a pipeline on the CPU unless
    told otherwise."""
    named = os.environ.get(DEVICE_ENV, "")
    if named:
        return parse_device(named, DEVICE_ENV)
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(value: str | torch.device, field: str = "device") -> str:
    """A device name checked and written the torch way ("cuda:1", "cpu"); a device this machine lacks is refused
    here with what it has, not later inside `.to()`. `field` names where the value came from in the error."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{field}={value!r} is not allowed: expected a torch device such as cuda, cuda:1 or cpu"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"{field}={value!r} is not available: torch sees {count} CUDA GPU(s) on this machine")
    return str(device)


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from a name ("fp16", "bfloat16", ...) or a dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"torch_dtype={value!r} is not allowed: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[value]


def load_pipeline(
    name_or_path: str | os.PathLike,
    *,
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """Load a diffusers pipeline.

    Args:
        name_or_path: a preset name (`shapes-sd`, `tiny-sd`, `tiny-wan`, ...: `diffattn presets`), a local folder
            saved with `save_pretrained`, or a hub id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`.
        torch_dtype: e.g. torch.float16 or "bf16". None: float32 for every component when the pipeline stays on
            the CPU (diffusers loads its models in float32, but transformers keeps a text encoder's saved half
            precision, which the CPU computes slowly and diffusers warns cannot run there); on a GPU, the saved
            dtype (the shipped fp16 presets: float16).
        device: where to move the pipeline; None leaves it on the CPU.

    Safetensors weights only; remote code is never trusted. Raises ModelLoadError with a readable message when
    the model is neither a preset, a folder, nor cached/reachable on the hub.
    """
    from diffusers import DiffusionPipeline

    dtype = parse_dtype(torch_dtype)
    device = None if device is None else parse_device(device)
    name = str(name_or_path)
    on_cpu = device is None or torch.device(device).type == "cpu"
    if dtype is None and on_cpu:
        dtype = torch.float32  # one dtype for every component (see torch_dtype)
    if name in PRESETS:
        source = preset_path(name)
        if dtype is None and PRESETS[name].shipped is not None:
            dtype = torch.float16  # shipped weights are fp16 to stay small; on a GPU they run as saved
    elif Path(name).expanduser().exists():
        source = Path(name).expanduser()
        check_pipeline_folder(source)
    else:
        source = name
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs[dtype_keyword()] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as exc:  # the hub client raises many types; translate the "cannot get it" family
        if isinstance(source, Path):
            first = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ModelLoadError(f"cannot load the pipeline folder {source}: {first}") from None
        if not _is_unreachable(exc):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or has no such repository"
        raise ModelLoadError(
            f"cannot load {name!r}: it is not a preset ({', '.join(PRESETS)}), not a local folder, not in the "
            f"Hugging Face cache, and {hint}. Download it once while online, or pass a local folder."
        ) from None
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(leave=False)
    return pipe


def check_pipeline_folder(folder: Path) -> None:
    """Raise ModelLoadError, in one line, for a local folder `from_pretrained` cannot load safely: no or a broken
    `model_index.json`, or a component whose weights are only pickled `.bin` files (never loaded: they can run
    code)."""
    import json

    index = folder / "model_index.json"
    if not folder.is_dir() or not index.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index} is not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(components, dict):
        raise ModelLoadError(f"{index} is not valid: expected a JSON object of components")
    for component, spec in components.items():
        sub = folder / component
        if component.startswith("_") or not isinstance(spec, list) or not sub.is_dir():
            continue
        has_pickle = any(sub.glob("*.bin")) or any(sub.glob("*.pt")) or any(sub.glob("*.ckpt"))
        if has_pickle and not any(sub.glob("*.safetensors")):
            raise ModelLoadError(
                f"{sub} has only pickled weights (.bin/.pt); diffattn loads safetensors only, since a pickle can run "
                "code. Convert it once where you trust it (load it, then save_pretrained(..., "
                "safe_serialization=True))"
            )


def _is_unreachable(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    unreachable = {
        "LocalEntryNotFoundError",
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "EntryNotFoundError",
        "HfHubHTTPError",
        "HFValidationError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "Timeout",
        "GatedRepoError",
        "OSError",
        "EnvironmentError",
        "ValueError",
    }
    return bool(names & unreachable)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def dtype_keyword() -> str:
    """The name `from_pretrained` takes the dtype under. diffusers renamed `torch_dtype` to `dtype` in 2026 (PR
    #14205) and warns on the old name on every load; older releases know only `torch_dtype`. The rename came with
    the private helper checked here: the one place a diffusers upgrade can break this."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
