"""What every model adapter provides: the attention layers of a denoiser and its latent geometry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch


AttentionKind = Literal["self", "cross", "joint"]


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a denoiser.

    Attributes:
        key: its key in `model.attn_processors` (``"<module path>.processor"``).
        module: the attention module itself.
        kind: "self" (tokens attend to themselves), "cross" (image/video queries, text keys) or "joint"
            (one sequence of video and text tokens).
        index: position among the denoiser's attention layers of the same kind, in module order.
        place: where the layer sits ("down", "mid", "up" in a UNet; "blocks", "single", ... in a transformer).
    """

    key: str
    module: torch.nn.Module
    kind: AttentionKind
    index: int
    place: str


@dataclass(frozen=True)
class LatentGeometry:
    """Batch and latent token grid of one denoiser call (video: frames > 1; images: frames == 1)."""

    batch_size: int
    frames: int
    height: int
    width: int


def attention_processors(model: torch.nn.Module) -> dict[str, Any]:
    """`model.attn_processors`, or the same dict built by walking the modules for models without AttentionMixin
    (Mochi's `MochiAttention` has a `processor` but no `set_processor`): keys are ``"<module path>.processor"``."""
    if hasattr(model, "attn_processors"):
        return model.attn_processors
    return {
        f"{name}.processor": module.processor
        for name, module in model.named_modules()
        if callable(getattr(module, "processor", None))
    }


def set_attention_processors(model: torch.nn.Module, processors: dict[str, Any]) -> None:
    """Install a full {key: processor} dict, through the model's public `set_attn_processor` where it has one."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(dict(processors))  # it consumes the dict it gets
        return
    modules = dict(model.named_modules())
    for key, processor in processors.items():
        module = modules[key[: -len(".processor")]]
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:
            module.processor = processor


class ModelAdapter:
    """Knowledge of one model family. Subclasses fill the class attributes and the two methods."""

    family: str = ""
    model_class_names: tuple[str, ...] = ()
    # The denoiser's forward argument holding the noisy latents, and its position when passed positionally.
    sample_argument: str = "hidden_states"

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return type(model).__name__ in cls.model_class_names

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def attention_layers(self) -> list[AttentionLayer]:
        raise NotImplementedError

    def geometry(self, sample: torch.Tensor) -> LatentGeometry:
        """Latent geometry from the denoiser's sample tensor (shapes only: no device sync)."""
        raise NotImplementedError

    def geometry_from_call(self, args: tuple, kwargs: dict[str, Any]) -> LatentGeometry:
        """Latent geometry of one denoiser call (families whose forward gets packed tokens override this)."""
        return self.geometry(self.sample_from_call(args, kwargs))

    def sample_from_call(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.sample_argument in kwargs:
            return kwargs[self.sample_argument]
        if args:
            return args[0]
        raise ValueError(f"{type(self.model).__name__}.forward was called without `{self.sample_argument}`")

    @staticmethod
    def timestep_from_call(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | float | None:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[1] if len(args) > 1 else None

    def _layers_by_kind(self, classify) -> list[AttentionLayer]:
        """Walk `model.attn_processors` order; `classify(path, module) -> (kind, place)` or None to skip."""
        modules = dict(self.model.named_modules())
        counters: dict[str, int] = {}
        layers = []
        for key in attention_processors(self.model):
            path = key[: -len(".processor")]
            module = modules[path]
            found = classify(path, module)
            if found is None:
                continue
            kind, place = found
            layers.append(AttentionLayer(key, module, kind, counters.get(kind, 0), place))
            counters[kind] = counters.get(kind, 0) + 1
        return layers
