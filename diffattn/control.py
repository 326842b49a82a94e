"""The control core: `apply` installs methods on a pipeline or denoiser, `remove` restores it exactly.

`apply(pipe_or_model, *configs)`:

1. finds the denoiser(s) (`unet`, `transformer`, and `transformer_2` for Wan 2.2; behind a `torch.compile`
   wrapper, the module it wraps) and their model adapter;
2. asks each config's method for processors for the layers it touches (nothing is installed yet, so a bad
   config, an overlap between configs or a layer holding a processor that is not plain attention, such as an
   IP-Adapter's, leaves the model untouched);
3. installs the processors with the model's public `set_attn_processor`, and one forward pre-hook per denoiser
   that fills a shared `DenoiserState` (step, timestep, batch, latent geometry) before every denoiser call and,
   at a denoiser's first call of a run, checks that the processors are still in place.

Step tracking. Given a pipeline, the scheduler's `set_timesteps` (one per pipeline run) and `step` (one per
denoising step) are wrapped on the scheduler instance: the step index is the number of `scheduler.step` calls
since the run began. That stays right with batched CFG, split CFG (two denoiser calls per step), extra forward
passes in one step and successive pipeline calls, and needs no device sync. Given a bare denoiser, the step
advances when the timestep changes and a new run starts when it rises; that reads the timestep's value
(one device sync per denoiser call, never per attention call).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from .adapters import AttentionLayer, ModelAdapter, adapter_for, attention_processors, set_attention_processors
from .state import DenoiserState


logger = logging.getLogger(__name__)

_HANDLES_ATTR = "_diffattn_handles"
_DENOISER_NAMES = ("unet", "transformer", "transformer_2")


class AttentionMethod:
    """One applied method. Subclasses build processors for the layers they change and may keep per-run stores.

    `supported_families`: adapter families the method works on (None: all).
    """

    supported_families: tuple[str, ...] | None = None

    def __init__(self, config: Any):
        self.config = config

    def processors(self, adapter: ModelAdapter, layers: list[AttentionLayer], state: DenoiserState) -> dict[str, Any]:
        """Processors keyed like `model.attn_processors`, for the layers this method changes (a subset)."""
        raise NotImplementedError

    def begin_run(self) -> None:
        """Called when a pipeline run starts; reset per-run stores here."""

    def attach(self, pipe: Any | None) -> None:
        """Called by `apply` after the processors are planned, with the pipeline (None for a bare denoiser).

        Methods that need pipeline-level data (the prompt, the text encoder) hook it here, on the instance only;
        raise to refuse (apply then installs nothing).
        """

    def detach(self) -> None:
        """Undo `attach` exactly (called by `remove`, also after a failed `apply`)."""


class MethodConfig:
    """Base of the frozen config dataclasses. `build()` makes the method that `apply` installs."""

    method_class: type[AttentionMethod]

    def build(self) -> AttentionMethod:
        return self.method_class(self)


def _uncompiled(model: Any) -> Any:
    """The module a `torch.compile(model)` wrapper runs, else `model`. torch's wrapper (`OptimizedModule`) keeps it in
    the private `_orig_mod`: processors and the pre-hook go on that module, which the compiled wrapper calls."""
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        return model._orig_mod
    return model


def find_denoisers(pipe_or_model: Any) -> tuple[Any | None, list[torch.nn.Module]]:
    """(pipeline or None, denoisers). A pipeline's denoisers are its `unet`, `transformer`, `transformer_2`; one
    wrapped by `torch.compile` is the module it wraps."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return None, [_uncompiled(pipe_or_model)]  # whether it is a supported denoiser is the adapters' call
    denoisers = [_uncompiled(getattr(pipe_or_model, n, None)) for n in _DENOISER_NAMES]
    denoisers = [d for d in denoisers if isinstance(d, torch.nn.Module)]
    if not denoisers:
        raise TypeError(
            f"found no denoiser in {type(pipe_or_model).__name__}: expected a diffusers pipeline with a `unet` or "
            "`transformer`, or the model itself"
        )
    return pipe_or_model, denoisers


_TRACKERS_ATTR = "_diffattn_step_trackers"
_WRAPPED = ("set_timesteps", "step")


class _SchedulerTracker:
    """Counts `scheduler.step` calls since the last `set_timesteps`, for one handle.

    The scheduler instance gets one pair of wrappers (instance attributes) shared by every handle tracking it, with
    the list of trackers they feed; each handle adds and removes only its own tracker, so handles stack and are
    removed in any order, and the last removal puts back exactly what the instance had before the first.
    """

    def __init__(self, state: DenoiserState):
        self.state = state
        self.scheduler = None
        self.steps_taken = 0

    def attach(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.steps_taken = 0
        registry = scheduler.__dict__.get(_TRACKERS_ATTR)
        if registry is None:
            registry = _wrap_scheduler(scheduler)
        registry["trackers"].append(self)

    def detach(self) -> None:
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is None:
            return
        registry = scheduler.__dict__.get(_TRACKERS_ATTR)
        if registry is None:
            return
        registry["trackers"] = [t for t in registry["trackers"] if t is not self]
        if not registry["trackers"]:
            for name in _WRAPPED:
                if name in registry["saved"]:
                    scheduler.__dict__[name] = registry["saved"][name]
                else:
                    scheduler.__dict__.pop(name, None)
            del scheduler.__dict__[_TRACKERS_ATTR]

    def run_started(self, scheduler: Any) -> None:
        self.steps_taken = 0
        self.state.begin_run(getattr(scheduler, "num_inference_steps", None))

    def step_taken(self) -> None:
        self.steps_taken += 1


def _wrap_scheduler(scheduler: Any) -> dict[str, Any]:
    """Install the shared `set_timesteps`/`step` wrappers on a scheduler instance; returns their registry."""
    registry: dict[str, Any] = {
        "trackers": [],
        "saved": {name: scheduler.__dict__[name] for name in _WRAPPED if name in scheduler.__dict__},
    }
    original_set_timesteps = scheduler.set_timesteps
    original_step = scheduler.step

    # functools.wraps keeps the signature visible: pipelines inspect it for `timesteps`, `sigmas`, `eta`.
    @functools.wraps(original_set_timesteps)
    def set_timesteps(*args, **kwargs):
        result = original_set_timesteps(*args, **kwargs)
        for tracker in list(registry["trackers"]):
            tracker.run_started(scheduler)
        return result

    @functools.wraps(original_step)
    def step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        for tracker in list(registry["trackers"]):
            tracker.step_taken()
        return result

    scheduler.__dict__[_TRACKERS_ATTR] = registry
    scheduler.set_timesteps = set_timesteps
    scheduler.step = step
    return registry


class _DenoiserHook:
    """Forward pre-hook logic shared by every denoiser of one `apply` call."""

    def __init__(self, state: DenoiserState, pipe: Any | None):
        self.state = state
        self.pipe = pipe
        self.tracker = _SchedulerTracker(state) if pipe is not None and hasattr(pipe, "scheduler") else None
        self._last_timestep: float | None = None
        if self.tracker is not None:
            self.tracker.attach(pipe.scheduler)

    def detach(self) -> None:
        if self.tracker is not None:
            self.tracker.detach()

    def __call__(self, adapter: ModelAdapter, args: tuple, kwargs: dict[str, Any]) -> None:
        state = self.state
        timestep = adapter.timestep_from_call(args, kwargs)
        if self.tracker is not None:
            if self.pipe.scheduler is not self.tracker.scheduler:
                # The user swapped schedulers after apply (between runs): track the new one from here.
                self.tracker.detach()
                self.tracker.attach(self.pipe.scheduler)
                state.begin_run(None)
            step = self.tracker.steps_taken
            if step == state.step_index:
                state.call_index += 1
            else:
                state.step_index, state.call_index = step, 0
            cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
            state.cfg_batched = bool(cfg) if isinstance(cfg, bool) else None
        else:
            self._advance_by_timestep(timestep)
        geometry = adapter.geometry_from_call(args, kwargs)
        state.timestep = timestep if isinstance(timestep, torch.Tensor) else None
        state.batch_size = geometry.batch_size
        state.frames, state.height, state.width = geometry.frames, geometry.height, geometry.width

    def _advance_by_timestep(self, timestep: Any) -> None:
        state = self.state
        if timestep is None:
            value = None
        elif isinstance(timestep, torch.Tensor):
            # bare-model mode only: one sync per denoiser call. The largest: Wan 2.2 TI2V gives every token its own
            # timestep, the conditioning frame's at 0 on every step, and the noisy tokens' carry the schedule.
            value = float(timestep.max())
        else:
            value = float(timestep)
        last = self._last_timestep
        if last is None or (value is not None and value > last):
            state.begin_run(None)
            state.step_index, state.call_index = 0, 0
        elif value == last:
            state.call_index += 1
        else:
            state.step_index, state.call_index = state.step_index + 1, 0
        self._last_timestep = value


class Handle:
    """What `apply` returns: `remove()` restores the model; method results are read through it."""

    def __init__(self, pipe: Any | None, denoisers: list[torch.nn.Module], methods: list[AttentionMethod]):
        self.pipe = pipe
        self.denoisers = denoisers
        self.methods = methods
        self.state = DenoiserState()
        self._originals: dict[int, dict[str, Any]] = {}
        self._installed: dict[int, dict[str, Any]] = {}
        self._hook_handles: list[Any] = []
        self._hook: _DenoiserHook | None = None
        self._checked_run: dict[int, int] = {}  # per denoiser: the last run whose processors were checked in place
        self.active = False

    @property
    def configs(self) -> list[Any]:
        return [m.config for m in self.methods]

    def method(self, kind: type) -> AttentionMethod:
        """The applied method of a config type (`handle.method(diffattn.RadialAttentionConfig)`) or method class."""
        for m in self.methods:
            if isinstance(m, kind) or isinstance(m.config, kind):
                return m
        raise LookupError(f"no {kind.__name__} was applied with this handle (applied: {self.configs})")

    def maps(self, **kwargs) -> torch.Tensor:
        """Cross-attention maps of the last run: `[steps, batch, tokens, h, w]` (needs an AttentionMapConfig)."""
        for method in self.methods:
            if hasattr(method, "maps"):
                return method.maps(**kwargs)
        raise LookupError(
            f"maps() needs diffattn.AttentionMapConfig among the applied configs (applied: {self.configs})"
        )

    def installed(self, model: torch.nn.Module, key: str) -> Any | None:
        """The processor this handle installed on `model`'s layer `key` (None: it left that layer alone)."""
        return self._installed.get(id(model), {}).get(key)

    def replaceable(self, model: torch.nn.Module, key: str) -> bool:
        """Whether `replace_original` can act on layer `key`: this handle's processor there falls back on another."""
        return hasattr(self.installed(model, key), "original")

    def replace_original(self, model: torch.nn.Module, key: str, processor: Any) -> None:
        """Put `processor` beneath this handle's processor on layer `key`: the one it falls back on (dense steps) and
        the one `remove()` restores. For changes made to the model after `apply` (context parallelism's processors);
        refused where `replaceable` is False."""
        if not self.replaceable(model, key):
            raise ValueError(
                f"{key} runs {type(self.installed(model, key)).__name__}, which has no processor beneath it to "
                f"replace; remove {self.configs} first, or make the change before diffattn.apply"
            )
        self.installed(model, key).original = processor
        self._originals[id(model)][key] = processor

    def _check_in_place(self, model: torch.nn.Module) -> None:
        """Raise if a processor this handle installed on `model` was replaced since `apply` (`load_ip_adapter`,
        `set_attn_processor`): the method would silently not run on that layer."""
        installed = self._installed.get(id(model), {})
        current = attention_processors(model) if installed else {}
        displaced = [key for key, processor in installed.items() if current.get(key) is not processor]
        if displaced:
            found = type(current.get(displaced[0])).__name__
            raise RuntimeError(
                f"{len(displaced)} of the {len(installed)} attention layers {self.configs} controls on "
                f"{type(model).__name__} hold another processor now ({displaced[0][: -len('.processor')]}: {found}), "
                "set after diffattn.apply (by load_ip_adapter, set_attn_processor, ...): the method would not run "
                "there. Remove the handle, make that change, then apply again (diffattn.apply refuses processors "
                "whose behaviour it would drop)"
            )

    def remove(self) -> None:
        """Restore the exact processor objects and remove the hooks and scheduler wrappers. Idempotent."""
        if not self.active:
            return
        for hook_handle in self._hook_handles:
            hook_handle.remove()
        self._hook_handles.clear()
        if self._hook is not None:
            self._hook.detach()
        for method in self.methods:
            method.detach()
        for model in self.denoisers:
            installed = self._installed.get(id(model), {})
            originals = self._originals.get(id(model), {})
            current = attention_processors(model)
            restore = dict(current)
            for key, processor in installed.items():
                if current.get(key) is processor:
                    restore[key] = originals[key]
            if any(restore[k] is not current[k] for k in restore):
                set_attention_processors(model, restore)
            handles = getattr(model, _HANDLES_ATTR, [])
            if self in handles:
                handles.remove(self)
            if not handles and _HANDLES_ATTR in model.__dict__:
                del model.__dict__[_HANDLES_ATTR]
        self.active = False
        logger.debug("diffattn: removed %s", self.configs)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Handle(active={self.active}, configs={self.configs})"


def _denoiser_name(pipe: Any | None, model: torch.nn.Module) -> str:
    """The pipeline attribute holding `model` (`unet`, `transformer`, `transformer_2`); a bare model: its class."""
    for name in _DENOISER_NAMES:
        if pipe is not None and _uncompiled(getattr(pipe, name, None)) is model:
            return name
    return type(model).__name__


def _check_not_applied(model: torch.nn.Module, methods: list[AttentionMethod]) -> None:
    for handle in getattr(model, _HANDLES_ATTR, []):
        for existing in handle.configs:
            for method in methods:
                if type(existing) is type(method.config):
                    raise RuntimeError(
                        f"{type(existing).__name__} is already applied to this {type(model).__name__}; call "
                        "handle.remove() or diffattn.remove(...) before applying it again"
                    )


def apply(pipe_or_model: Any, *configs: MethodConfig) -> Handle:
    """Install the methods described by `configs` on a diffusers pipeline or denoiser; all or nothing.

    Returns a `Handle`; `handle.remove()` (or `diffattn.remove(pipe_or_model)`) restores the original processors.
    Raises ValueError for an unsupported model, TypeError for a non-config argument, RuntimeError if a config is
    already applied, two methods would replace the same attention layer, or a layer to replace holds a processor
    that is not plain attention (an IP-Adapter's, say), whose behaviour the replacement would drop.
    """
    if not configs:
        raise ValueError("apply() needs at least one config, e.g. diffattn.AttentionMapConfig()")
    for config in configs:
        if not isinstance(config, MethodConfig):
            raise TypeError(f"apply() takes diffattn config objects, got {type(config).__name__}: {config!r}")
    seen_types = [type(c) for c in configs]
    duplicates = {t.__name__ for t in seen_types if seen_types.count(t) > 1}
    if duplicates:
        raise ValueError(f"the same config type was passed twice: {sorted(duplicates)}")

    pipe, denoisers = find_denoisers(pipe_or_model)
    methods = [config.build() for config in configs]
    handle = Handle(pipe, denoisers, methods)

    # 1. Plan everything before touching the model.
    plan: dict[int, tuple[torch.nn.Module, ModelAdapter, dict[str, Any]]] = {}
    for model in denoisers:
        adapter = adapter_for(model)
        adapter.model_name = _denoiser_name(pipe, model)
        _check_not_applied(model, methods)
        layers = adapter.attention_layers()
        new_processors: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for method in methods:
            if method.supported_families is not None and adapter.family not in method.supported_families:
                raise ValueError(
                    f"{type(method.config).__name__} does not support the {adapter.family} family "
                    f"({type(model).__name__}); it supports: {', '.join(method.supported_families)}"
                )
            for key, processor in method.processors(adapter, layers, handle.state).items():
                if key in owners:
                    raise RuntimeError(
                        f"{type(method.config).__name__} and {owners[key]} both replace the processor of {key}"
                    )
                owners[key] = type(method.config).__name__
                new_processors[key] = processor
        for other in getattr(model, _HANDLES_ATTR, []):
            taken = set(other._installed.get(id(model), {})) & set(new_processors)
            if taken:
                raise RuntimeError(
                    f"{sorted(taken)[0]} is already controlled by {other.configs}; remove that handle first"
                )
        current = attention_processors(model)
        for key in new_processors:
            if adapter.is_foreign_processor(current[key]):
                kind = type(current[key])
                raise RuntimeError(
                    f"{key[: -len('.processor')]} holds {kind.__module__}.{kind.__name__}, not one of diffusers' "
                    f"plain attention processors: {owners[key]} would replace it and silently drop what it adds "
                    "(an IP-Adapter's image prompt, perturbed-attention guidance, Custom Diffusion, a processor of "
                    "your own). Take it out first (an IP-Adapter: pipe.unload_ip_adapter()), or apply diffattn to a "
                    "model without it"
                )
        plan[id(model)] = (model, adapter, new_processors)

    # 2. Install; on any failure put back what was there.
    try:
        hook = _DenoiserHook(handle.state, pipe)
        handle._hook = hook
        for method in methods:
            method.attach(pipe)
        for model, adapter, new_processors in plan.values():
            originals = attention_processors(model)
            handle._originals[id(model)] = originals
            handle._installed[id(model)] = new_processors
            if new_processors:
                set_attention_processors(model, {**originals, **new_processors})

            def pre_hook(module, args, kwargs, _adapter=adapter):
                hook(_adapter, args, kwargs)
                if handle._checked_run.get(id(module)) != handle.state.run_index:  # a denoiser's first call of a run
                    handle._check_in_place(module)
                    handle._checked_run[id(module)] = handle.state.run_index
                return None

            handle._hook_handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
            model.__dict__.setdefault(_HANDLES_ATTR, []).append(handle)
        for method in methods:
            handle.state.add_run_listener(method.begin_run)
        handle.active = True
    except BaseException:
        handle.active = True
        handle.remove()
        raise
    logger.info(
        "diffattn: applied %s to %s", [type(c).__name__ for c in configs], [type(d).__name__ for d in denoisers]
    )
    return handle


def remove(pipe_or_model: Any) -> int:
    """Remove every diffattn handle from a pipeline or denoiser; returns how many were removed."""
    _, denoisers = find_denoisers(pipe_or_model)
    handles: list[Handle] = []
    for model in denoisers:
        for handle in getattr(model, _HANDLES_ATTR, []):
            if handle not in handles:
                handles.append(handle)
    for handle in reversed(handles):
        handle.remove()
    return len(handles)


def applied(pipe_or_model: Any) -> list[Handle]:
    """The active handles on a pipeline or denoiser."""
    _, denoisers = find_denoisers(pipe_or_model)
    out: list[Handle] = []
    for model in denoisers:
        out.extend(h for h in getattr(model, _HANDLES_ATTR, []) if h not in out)
    return out
