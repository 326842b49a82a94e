"""Pipelines that own their denoising loop (import name diffattn.pipelines)."""

from .astar import AStarPipeline, AStarPipelineOutput, concept_token_indices


__all__ = ["AStarPipeline", "AStarPipelineOutput", "concept_token_indices"]
