"""Pipelines that own their denoising loop (import name diffattn.pipelines)."""

from .astar import AStarPipeline, AStarPipelineOutput, AStarXLPipeline, concept_token_indices
from .ir_diffusion import IRDiffusionPipeline, IRDiffusionPipelineOutput, IRDiffusionXLPipeline


__all__ = [
    "AStarPipeline",
    "AStarXLPipeline",
    "AStarPipelineOutput",
    "concept_token_indices",
    "IRDiffusionPipeline",
    "IRDiffusionXLPipeline",
    "IRDiffusionPipelineOutput",
]
