"""`GenerationRequest`: one validated description of one generation, built by every face (CLI, job files, UI, demo,
Python callers) so that all of them accept and refuse the same inputs with the same message.

A request is checked when it is made: types (ints are not bools, strings are not lists), ranges (finite numbers,
seeds in [0, 2^63)), choices (from the one tuple each lives beside) and combinations that cannot run together;
`generation.check_request_limits` holds it to the size `Limits`. Nothing is loaded or allocated to do either.
`None` means "the model's default" (the preset's, else the pipeline's own); any other value is used exactly as given.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from .guidance import GuidanceInterval
from .methods.agent_attention import AgentAttentionConfig
from .methods.ir_diffusion import IRDiffusionConfig
from .methods.radial_attention import RadialAttentionConfig
from .methods.structured_guidance import StructuredGuidanceConfig
from .validation import (
    check_bool,
    check_choice,
    check_config_fields,
    check_int_range,
    check_interval,
    check_number,
    check_seed,
    check_str,
    check_str_list,
    refuse,
)


ASTAR_LOSSES = ("astar", "attend_and_excite", "both")  # AStarPipeline's `loss` values
MASK_SOURCES = ("auto", "attention", "segmenter")  # where IR-Diffusion's subject masks come from
MAX_GUIDANCE_SCALE = 100.0
SIZE_MULTIPLE = 8  # every supported VAE downsamples by 8 (some models need 16 or 32: their pipeline says so)
_CONFIG_TYPES = {
    "radial": RadialAttentionConfig,
    "agent": AgentAttentionConfig,
    "structured": StructuredGuidanceConfig,
    "ir": IRDiffusionConfig,
}


@dataclass(frozen=True)
class GenerationRequest:
    """One image or video to generate. Raises ValueError (naming the field, the value and what is allowed) or
    TypeError when it cannot run. Size limits depend on who serves the request: `generation.check_request_limits`
    checks one against `diffattn.Limits` with the preset's defaults filled in."""

    model: str
    prompt: str
    seed: int = 0
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    attention_maps: bool = True
    radial: RadialAttentionConfig | None = None
    agent: AgentAttentionConfig | None = None
    structured: StructuredGuidanceConfig | None = None
    astar: str | None = None
    subjects: tuple[str, ...] | None = None
    ir: IRDiffusionConfig | None = None
    masks: str = "auto"

    def __post_init__(self):
        check_str("model", self.model, max_length=1000)
        check_str("prompt", self.prompt)
        check_seed("seed", self.seed)
        if self.negative_prompt is not None:
            check_str("negative_prompt", self.negative_prompt, allow_empty=True)
        if self.steps is not None:
            check_int_range("steps", self.steps, 1)
        if self.guidance_scale is not None:
            check_number("guidance_scale", self.guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
        if self.guidance_interval is not None:
            interval = self.guidance_interval
            if isinstance(interval, GuidanceInterval):
                interval = (interval.start, interval.stop)
            object.__setattr__(self, "guidance_interval", check_interval("guidance_interval", interval))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                check_int_range(name, value, SIZE_MULTIPLE)
                if value % SIZE_MULTIPLE:
                    raise refuse(name, value, f"a multiple of {SIZE_MULTIPLE} (pixels)")
        if self.num_frames is not None:
            check_int_range("num_frames", self.num_frames, 1)
        check_bool("attention_maps", self.attention_maps)
        for name, kind in _CONFIG_TYPES.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name}={value!r} is not allowed: expected a diffattn.{kind.__name__} or None")
        if self.astar is not None:
            check_choice("astar", self.astar, ASTAR_LOSSES)
        if self.subjects is not None:
            object.__setattr__(self, "subjects", check_str_list("subjects", self.subjects))
        check_choice("masks", self.masks, MASK_SOURCES)
        self._check_combination()

    def _check_combination(self) -> None:
        """Methods that run their own pipeline (A-STAR, IR-Diffusion) do not take the others: refused, not dropped."""
        if self.subjects is None:
            if self.ir is not None or self.masks != "auto":
                raise ValueError("ir and masks are IR-Diffusion settings: they need subjects (one prompt per subject)")
        else:
            clash = [n for n in ("radial", "agent", "structured", "astar") if getattr(self, n) is not None]
            clash += ["guidance_interval"] if self.guidance_interval is not None else []
            if clash:
                raise ValueError(
                    f"subjects (IR-Diffusion) runs its own pipeline and does not combine with {', '.join(clash)}"
                )
        if self.astar is not None:
            clash = [n for n in ("radial", "agent", "structured") if getattr(self, n) is not None]
            if clash:
                raise ValueError(f"astar (A-STAR) runs its own pipeline and does not combine with {', '.join(clash)}")
        if self.radial is not None and (self.agent is not None or self.structured is not None):
            raise ValueError("radial is for video transformers; agent and structured are for Stable Diffusion UNets")

    def settings(self) -> dict[str, Any]:
        """Everything but prompt and seed: requests with equal settings can share one pipeline call."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("prompt", "seed")}

    def to_dict(self) -> dict[str, Any]:
        """JSON values only: configs as their fields (with `None` for "off"), tuples as lists."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _CONFIG_TYPES and value is not None:
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(value).items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """The inverse of `to_dict` (unknown keys refused)."""
        if not isinstance(data, dict):
            raise TypeError(f"a request is a JSON object of fields, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown request field {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in missing if name not in data]
        if missing:
            raise ValueError(
                f"a request needs the field(s) {', '.join(missing)}; got {', '.join(sorted(data)) or 'none'}"
            )
        values = dict(data)
        for name, kind in _CONFIG_TYPES.items():
            if isinstance(values.get(name), dict):
                values[name] = kind(**check_config_fields(name, values[name], kind))
        for name in ("guidance_interval", "subjects"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)
