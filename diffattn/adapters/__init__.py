"""Model adapters: the one place that knows each model family's attention modules and token layout."""

from __future__ import annotations

import torch

from .base import AttentionLayer, LatentGeometry, ModelAdapter, attention_processors, set_attention_processors
from .cogvideox import CogVideoXAdapter, CogVideoXJointAttnProcessor
from .hunyuan_video import HunyuanVideoAdapter, HunyuanVideoJointAttnProcessor
from .ltx_video import LTXVideoAdapter, LTXVideoSelfAttnProcessor
from .mochi import MochiAdapter, MochiJointAttnProcessor
from .unet import UNetAdapter, UNetAttnProcessor
from .wan import WanAdapter, WanSelfAttnProcessor


ADAPTERS: tuple[type[ModelAdapter], ...] = (
    UNetAdapter,
    WanAdapter,
    HunyuanVideoAdapter,
    CogVideoXAdapter,
    LTXVideoAdapter,
    MochiAdapter,
)


def supported_families() -> str:
    return ", ".join(f"{a.family} ({', '.join(a.model_class_names)})" for a in ADAPTERS)


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for `model`; a ValueError listing the supported families if there is none."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches(model):
            return adapter_cls(model)
    raise ValueError(
        f"diffattn does not support {type(model).__name__}; supported model families: {supported_families()}"
    )
