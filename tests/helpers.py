"""Shared test helpers: tiny pipelines and a spy method that records what processors see."""

from __future__ import annotations

import sys

import torch

import diffattn
from diffattn.adapters import attention_processors
from diffattn.control import AttentionMethod, MethodConfig
from diffattn.presets import PRESETS


def torchrun(processes: int) -> list[str]:
    """The command that launches `processes` local processes; --standalone picks a free port for each launch, so
    consecutive or concurrent launches never meet on torchrun's default one."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]


def load(name: str):
    pipe = diffattn.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, name: str, steps: int = 3, seed: int = 0, prompt: str = "a red cat", **overrides):
    kwargs = dict(PRESETS[name].call_defaults)
    kwargs.update(overrides)
    if "num_frames" not in PRESETS[name].call_defaults:
        kwargs.pop("num_frames", None)
    out = pipe(
        prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs
    )
    return out.images if hasattr(out, "images") else out.frames


class SpyProcessor:
    """Wraps a layer's original processor: records the shared state, then delegates (so outputs are unchanged)."""

    def __init__(self, original, state, log):
        self.original = original
        self.state = state
        self.log = log

    def __call__(self, attn, hidden_states, *args, **kwargs):
        s = self.state
        self.log.append(
            (
                s.step_index,
                s.call_index,
                s.run_index,
                s.batch_size,
                s.frames,
                s.height,
                s.width,
                None if s.timestep is None else float(s.timestep.flatten()[0]),
            )
        )
        return self.original(attn, hidden_states, *args, **kwargs)


class SpyMethod(AttentionMethod):
    """Records the state at the first attention layer of each denoiser call."""

    def __init__(self, config):
        super().__init__(config)
        self.log: list[tuple] = []

    def processors(self, adapter, layers, state):
        first = layers[0]
        return {first.key: SpyProcessor(attention_processors(adapter.model)[first.key], state, self.log)}


class SpyConfig(MethodConfig):
    method_class = SpyMethod

    def __repr__(self):
        return "SpyConfig()"


class OtherSpyConfig(SpyConfig):
    """A second config type that replaces the same layer as SpyConfig (to test overlap errors)."""
