"""diffattn: attention control and acceleration for Hugging Face diffusers.

handle = diffattn.apply(pipe, diffattn.AttentionMapConfig())
image = pipe(prompt).images[0]
maps = handle.maps()          # [steps, batch, tokens, h, w]
handle.remove()               # the exact original processors and hooks are back
"""

from .adapters import supported_families
from .control import AttentionMethod, Handle, MethodConfig, applied, apply, remove
from .generation import GenerationResult, NonFiniteOutputError, generate, generate_batch
from .guidance import GuidanceInterval
from .limits import Limits
from .loading import ModelLoadError, load_pipeline
from .methods import (
    AgentAttentionConfig,
    AgentAttentionProcessor,
    AttentionMapConfig,
    AttentionMapProcessor,
    IRCrossAttnProcessor,
    IRDiffusionConfig,
    IRSelfAttnProcessor,
    RadialAttentionConfig,
    StructuredGuidanceConfig,
    plot_radial_mask,
    prompt_token_labels,
    radial_block_mask,
    render_attention_grid,
)
from .presets import PRESETS, preset_path
from .request import GenerationRequest
from .state import DenoiserState


__version__ = "0.1.0"

__all__ = [
    "apply",
    "remove",
    "applied",
    "Handle",
    "AttentionMethod",
    "MethodConfig",
    "DenoiserState",
    "load_pipeline",
    "ModelLoadError",
    "PRESETS",
    "preset_path",
    "AttentionMapConfig",
    "AttentionMapProcessor",
    "prompt_token_labels",
    "render_attention_grid",
    "RadialAttentionConfig",
    "AgentAttentionConfig",
    "AgentAttentionProcessor",
    "StructuredGuidanceConfig",
    "IRDiffusionConfig",
    "IRSelfAttnProcessor",
    "IRCrossAttnProcessor",
    "GuidanceInterval",
    "radial_block_mask",
    "plot_radial_mask",
    "supported_families",
    "GenerationRequest",
    "GenerationResult",
    "generate",
    "generate_batch",
    "Limits",
    "NonFiniteOutputError",
]
