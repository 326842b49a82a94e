"""Context parallelism for one generation across processes, on diffusers' own engine.

    torchrun --nproc-per-node 2 -m diffattn generate -m Wan-AI/Wan2.1-T2V-1.3B-Diffusers -p "a boat" --radial \\
        --context-parallel 2

Each process loads the pipeline on its device and `transformer.enable_parallelism(ContextParallelConfig(...))`
shards the sequence across them (Ulysses by default, ring with `ring=True`); radial attention follows the parallel
config (see `diffattn.methods.radial_attention`). HunyuanVideo, CogVideoX and Mochi, for which diffusers has no
plan, get diffattn's (`ModelAdapter.context_parallel_support`: video sharded, text whole on every rank, Ulysses
only). Every process runs the same call with the same seed; process 0 writes the outputs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .validation import check_bool, check_int_range


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate) started for this run: WORLD_SIZE, 1 without one."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} is not a process count") from None


def check_single_process(command: str, instead: str) -> None:
    """Refuse a command that does one job in one process when a launcher started several: each would do the same
    work and write the same outputs."""
    world = launched_processes()
    if world > 1:
        raise ValueError(
            f"diffattn {command} runs in one process, but this launch started {world} (WORLD_SIZE={world}): each "
            f"would do the same work and write the same outputs; {instead}"
        )


def init_processes(degree: int) -> tuple[int, int, str]:
    """(rank, world size, device) of this process in a launch of exactly `degree` processes (torchrun); starts
    torch.distributed (nccl on CUDA, gloo on the CPU) when the launcher has not."""
    import torch.distributed as dist

    check_int_range("context_parallel", degree, 2)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"--context-parallel {degree} needs {degree} processes: launch with torchrun --nproc-per-node "
                f"{degree} "
                "-m diffattn generate ..."
            )
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    if world != degree:
        raise ValueError(f"--context-parallel {degree} does not match the {world} launched processes")
    rank = dist.get_rank()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu"
    return rank, world, device


@contextlib.contextmanager
def _cpu_device_count():
    # diffusers 0.42's enable_parallelism computes `rank % torch.accelerator.device_count()`, which divides by zero
    # on a machine without an accelerator; seen as 1 there only while it runs, it builds a CPU mesh on gloo.
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def group_mesh(degree: int):
    """A device mesh splitting the launch into groups of `degree` processes, for diffusers' context parallelism
    within each group: dims ("group", "ring", "ulysses") of sizes (world / degree, 1, degree)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % degree:
        raise ValueError(f"context_parallel={degree} is not allowed: it must divide the {world} launched processes")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (world // degree, 1, degree), mesh_dim_names=("group", "ring", "ulysses"))


def enable_context_parallel(pipe: Any, degree: int, ring: bool = False, mesh: Any = None) -> None:
    """Shard `pipe`'s video transformer(s) over `degree` processes (Ulysses, or ring) with diffusers' engine; `mesh`
    (from `group_mesh`) when the launch holds several groups of `degree` processes (Ulysses only)."""
    from diffusers import ContextParallelConfig

    check_int_range("context_parallel", degree, 2)
    check_bool("ring", ring)
    if mesh is not None and ring:
        raise ValueError("ring=True is not allowed with a group mesh: groups run Ulysses")
    denoisers = [
        d for d in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if d is not None
    ]
    adapters = [_adapter(d) for d in denoisers]
    supports = [None if a is None else a.context_parallel_support() for a in adapters]
    if not denoisers or any(
        getattr(d, "_cp_plan", None) is None and (support is None or support[0] is None)
        for d, support in zip(denoisers, supports)
    ):
        raise ValueError(
            f"{type(pipe).__name__} has no transformer with a context-parallel plan: diffusers has plans for Wan, "
            "LTX-Video and others (_cp_plan), diffattn adds HunyuanVideo's, CogVideoX's and Mochi's"
        )
    for denoiser, adapter, support in zip(denoisers, adapters, supports):
        if ring:
            config = ContextParallelConfig(ring_degree=degree)
        else:
            config = ContextParallelConfig(ulysses_degree=degree, mesh=mesh)
        plan = None if support is None else _install_own_processors(denoiser, adapter, support, ring)
        with _cpu_device_count():
            denoiser.enable_parallelism(config=config, cp_plan=plan)
        if adapter is not None:
            denoiser.register_forward_pre_hook(even_shards_check(denoiser, degree), with_kwargs=True)


def _adapter(denoiser: Any):
    """diffattn's adapter for the transformer, or None for one it does not know (diffusers' plan alone then)."""
    from .adapters import adapter_for

    try:
        return adapter_for(denoiser)
    except ValueError:
        return None


def even_shards_check(denoiser: Any, degree: int):
    """A forward pre-hook refusing a call whose video tokens do not split into `degree` equal shards, with the
    geometry in the message (diffusers' splitter only asserts). Runs before diffusers' hooks: they live inside
    `forward`, torch's pre-hooks before it. Shapes only, no device sync."""
    from .adapters import adapter_for

    adapter = adapter_for(denoiser)

    def check(module, args, kwargs):
        geometry = adapter.geometry_from_call(args, kwargs)
        tokens = geometry.frames * geometry.height * geometry.width
        if tokens % degree:
            raise ValueError(
                f"context_parallel={degree} needs video tokens that split into {degree} equal shards: "
                f"{geometry.frames} latent frames x {geometry.height} x {geometry.width} = {tokens} tokens do not; "
                "choose a frame count or size whose token count the degree divides"
            )

    return check


def _install_own_processors(denoiser: Any, adapter: Any, support: tuple, ring: bool) -> dict | None:
    """Install the Ulysses processors diffattn's support for this family names (`support`, from
    `adapter.context_parallel_support()`: HunyuanVideo, CogVideoX, Mochi: the joint attention its plan needs;
    LTX-Video: the cross-attention diffusers' fails on); returns diffattn's plan, or None to keep diffusers'. On a
    layer a diffattn method already controls (apply came first), the new processor goes beneath the method's: its
    dense path, and what `remove()` restores."""
    from .adapters import attention_processors, set_attention_processors
    from .control import applied

    name = type(denoiser).__name__
    if ring:
        raise ValueError(f"ring=True is not allowed for {name}: diffattn's context parallelism for it is Ulysses only")
    if getattr(denoiser.config, "image_condition_type", None) == "token_replace":
        raise ValueError(f"{name} image-to-video (token_replace) has no context-parallel plan: its first frame is "
                         "handled apart from the sharded tokens")  # fmt: skip
    plan, processor_classes = support
    processors = attention_processors(denoiser)
    handles = applied(denoiser)
    layers = [layer for layer in adapter.attention_layers() if layer.kind in processor_classes]
    owners = {layer.key: next((h for h in handles if h.installed(denoiser, layer.key) is not None), None)
              for layer in layers}  # fmt: skip
    for key, owner in owners.items():  # all or nothing: check every layer before changing one
        if owner is not None and not owner.replaceable(denoiser, key):
            raise ValueError(
                f"{key} of {name} runs {type(owner.installed(denoiser, key)).__name__} from {owner.configs}, which "
                "has no processor beneath it for context parallelism to replace; enable context parallelism first"
            )
    for layer in layers:
        processor = processor_classes[layer.kind]()
        owner = owners[layer.key]
        if owner is None:
            processors[layer.key] = processor
        else:  # applied first: the method's processor falls back on this one, and remove() restores it
            owner.replace_original(denoiser, layer.key, processor)
    set_attention_processors(denoiser, processors)
    return plan
