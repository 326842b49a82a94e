"""What processors cannot see for themselves: the denoising step, the timestep, the batch and the latent geometry.

One `DenoiserState` is shared by every processor a `diffattn.apply` call installs. A forward pre-hook on the
denoiser fills it before each denoiser call (see `diffattn.control`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class DenoiserState:
    """Per-call facts about the denoiser, read by processors.

    Attributes:
        step_index: denoising step of the current call, 0-based; -1 before the first call of a run.
        call_index: index of the current call within its step (batched CFG: always 0; split CFG: 0 and 1;
            extra forward passes such as A-STAR's: 0, 1, 2, ...).
        run_index: how many pipeline runs (calls) have started since `apply`, counting the current one.
        num_inference_steps: the length of the schedule when the scheduler is known, else None.
        timestep: the timestep tensor the denoiser was called with (kept on its device; never synced).
        batch_size: the denoiser's batch (with batched CFG this is twice the number of prompts).
        frames, height, width: latent geometry in tokens (images: frames == 1), after patching.
        cfg_batched: the pipeline's `do_classifier_free_guidance` at this call (None without a pipeline). SD-family
            pipelines run guidance as one doubled batch [uncond, cond], which is what the map and structured
            methods rely on; video pipelines (Wan) run it as two calls, which the step tracking handles apart.
    """

    step_index: int = -1
    call_index: int = 0
    run_index: int = 0
    num_inference_steps: int | None = None
    timestep: torch.Tensor | None = None
    batch_size: int = 0
    frames: int = 1
    height: int = 0
    width: int = 0
    cfg_batched: bool | None = None
    _listeners: list = field(default_factory=list, repr=False)

    @property
    def num_tokens(self) -> int:
        """Latent tokens per sample: frames x height x width."""
        return self.frames * self.height * self.width

    def begin_run(self, num_inference_steps: int | None = None) -> None:
        """Start a new pipeline run: the next denoiser call is step 0."""
        self.run_index += 1
        self.step_index = -1
        self.call_index = 0
        self.num_inference_steps = num_inference_steps
        for listener in self._listeners:
            listener()

    def add_run_listener(self, listener) -> None:
        """Call `listener()` whenever a new run starts (methods reset per-run stores there)."""
        self._listeners.append(listener)

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """(h, w) of a UNet attention level with `num_tokens` tokens per frame.

        Each UNet level halves the latent with a stride-2 convolution (padding 1), so sizes round up.
        """
        h, w = self.height, self.width
        if h <= 0 or w <= 0:
            raise RuntimeError("the latent geometry is unknown: the denoiser has not been called through diffattn")
        while h * w > num_tokens and h > 1 and w > 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != num_tokens:
            raise ValueError(f"{num_tokens} tokens do not match any level of a {self.height}x{self.width} latent grid")
        return h, w
