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


# diffusers' own processors that compute plain attention and nothing else, whatever the family (each adapter adds its
# family's, `ModelAdapter.plain_processor_names`): the ones a diffattn method may replace. Anything else on a layer
# (an IP-Adapter's, perturbed-attention guidance's, Custom Diffusion's, a user's own) adds something that a diffattn
# processor in its place would silently drop.
PLAIN_PROCESSOR_NAMES = (
    "AttnProcessor", "AttnProcessor2_0", "AttnProcessorNPU", "FusedAttnProcessor2_0", "SlicedAttnProcessor",
    "XFormersAttnProcessor", "XLAFlashAttnProcessor2_0", "AttnAddedKVProcessor", "AttnAddedKVProcessor2_0",
    "SlicedAttnAddedKVProcessor", "XFormersAttnAddedKVProcessor",
)  # fmt: skip


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


def sdpa_bnhd(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA on diffusers' [B, N, H, D] layout (views in, [B, N, H, D] out); key_mask: bool [B, Nk] or None."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def project_heads(attn: torch.nn.Module, x: torch.Tensor, q: str, k: str, v: str, norm_q: str, norm_k: str):
    """q, k, v projections of x by the named linear layers, split into heads [B, N, H, D], q/k normed if the module
    has those norms (diffusers' legacy `Attention` keeps `norm_q`/`norm_k` and `norm_added_q`/`norm_added_k`)."""
    query = getattr(attn, q)(x).unflatten(2, (attn.heads, -1))
    key = getattr(attn, k)(x).unflatten(2, (attn.heads, -1))
    value = getattr(attn, v)(x).unflatten(2, (attn.heads, -1))
    if getattr(attn, norm_q, None) is not None:
        query = getattr(attn, norm_q)(query)
    if getattr(attn, norm_k, None) is not None:
        key = getattr(attn, norm_k)(key)
    return query, key, value


class ModelAdapter:
    """Knowledge of one model family. Subclasses fill the class attributes and the two methods."""

    family: str = ""
    model_class_names: tuple[str, ...] = ()
    # The denoiser's forward argument holding the noisy latents, and its position when passed positionally.
    sample_argument: str = "hidden_states"

    plain_processor_names: tuple[str, ...] = ()  # the family's own plain-attention processors in diffusers

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return type(model).__name__ in cls.model_class_names

    def __init__(self, model: torch.nn.Module, model_name: str = "denoiser"):
        self.model = model
        self.model_name = model_name  # the pipeline's attribute holding it (`unet`, `transformer`, `transformer_2`)

    def attention_layers(self) -> list[AttentionLayer]:
        raise NotImplementedError

    def is_foreign_processor(self, processor: Any) -> bool:
        """Whether a diffattn method must refuse to replace `processor`: neither diffattn's own nor one of diffusers'
        plain attention processors of this family (`PLAIN_PROCESSOR_NAMES`, `plain_processor_names`)."""
        package = type(processor).__module__.split(".")[0]
        if package == "diffattn":
            return False
        names = PLAIN_PROCESSOR_NAMES + self.plain_processor_names
        return package != "diffusers" or type(processor).__name__ not in names

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

    def context_parallel_support(self) -> tuple[dict | None, dict[str, type]] | None:
        """What diffattn adds to diffusers' context parallelism for this family: (plan, {layer kind: processor class
        to install on those layers}). The plan is diffattn's for a family diffusers has none for (None: keep
        diffusers' `_cp_plan`); the processors run those layers under Ulysses. None: diffusers' as they are.
        """
        return None

    @staticmethod
    def timestep_from_call(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | float | None:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[1] if len(args) > 1 else None

    def _self_and_cross_layers(self, place=lambda path: "blocks") -> list[AttentionLayer]:
        """The layers of a model whose blocks name self-attention `attn1` and cross-attention `attn2` (diffusers'
        convention for UNets, Wan and LTX); `place(path)` names where each sits."""

        def classify(path: str, module: torch.nn.Module):
            kind = {"attn1": "self", "attn2": "cross"}.get(path.rsplit(".", 1)[-1])
            return None if kind is None else (kind, place(path))

        return self._layers_by_kind(classify)

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
