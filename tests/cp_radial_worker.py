"""Run under `torchrun --nproc-per-node N` (gloo, CPU) by tests/test_context_parallel.py: radial attention under
diffusers' Ulysses context parallelism against the single-process run, printed as one JSON line per rank and case.

Arguments: one or more cases, each `order:frames:height:width:preset`, run one after another in the same process
group (each on a freshly loaded pipeline), so the processes start once."""

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    # diffusers 0.42's enable_parallelism computes `rank % torch.accelerator.device_count()`, which divides by zero
    # on a CPU-only machine; seen as 1 here (this worker only), the engine builds a CPU mesh and runs on gloo.
    torch.accelerator.device_count = lambda: 1
    torch.set_num_threads(1)
    for case in sys.argv[1:]:
        run_case(case)
        dist.barrier()
    dist.destroy_process_group()


def run_case(case: str) -> None:
    from diffusers import ContextParallelConfig

    import diffattn
    from diffattn.adapters import attention_processors
    from diffattn.presets import get_preset

    # "apply-first", "parallel-first", "diffattn-plan" (enable_context_parallel, then apply) or "apply-then-plan"
    order, frames, height, width, name = case.split(":")
    frames, height, width = int(frames), int(height), int(width)
    if dist.get_rank() == 0:
        diffattn.preset_path(name)  # one process builds the preset into the test session's cache
    dist.barrier()
    pipe = diffattn.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    config = diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=1, block_size=64)

    # HunyuanVideo's guidance_scale is an embedded (distilled) guidance; its classifier-free guidance is true_cfg_scale
    cfg = {"negative_prompt": ["blurry", "dark"], "true_cfg_scale": 3.0} if "hunyuan" in name else {}
    cfg["max_sequence_length"] = get_preset(name).call_defaults["max_sequence_length"]  # CogVideoX: its text length

    seen = []  # video tokens reaching the first video attention layer, one entry per call
    first_layers = ("blocks.0.attn1", "transformer_blocks.0.attn1", "transformer_blocks.0.attn")
    first_attention = next(m for n, m in transformer.named_modules() if n in first_layers)

    def record(module, args, kwargs):
        tokens = (args[0] if args else kwargs["hidden_states"]).shape[1]
        if not seen or seen[-1][1] != len(calls):
            seen.append((tokens, len(calls)))

    first_attention.register_forward_pre_hook(record, with_kwargs=True)
    calls = []

    def call():
        calls.append(1)
        out = pipe(["a boat on the "
                    "sea", "a dog"], num_inference_steps=3, num_frames=frames, height=height, width=width,
                   guidance_scale=5.0, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                   output_type="latent", **cfg)  # fmt: skip
        return out.frames  # the denoised latents: what parallelism changes; the VAE decodes them the same either way

    dense = call()
    single_handle = diffattn.apply(pipe, config)
    single = call()  # the single-process radial run: step 0 dense, steps 1-2 sparse
    single_handle.remove()
    cp = ContextParallelConfig(ulysses_degree=dist.get_world_size())
    if order == "diffattn-plan":  # a family diffusers has no plan for: diffattn.parallel installs its own
        from diffattn.parallel import enable_context_parallel

        enable_context_parallel(pipe, dist.get_world_size())
        processors_before = dict(attention_processors(transformer))
        handle = diffattn.apply(pipe, config)
    elif order == "apply-then-plan":  # diffattn's processors go beneath radial's; remove() leaves them
        from diffattn.parallel import enable_context_parallel

        processors_before = {}
        handle = diffattn.apply(pipe, config)
        enable_context_parallel(pipe, dist.get_world_size())
    elif order == "apply-first":
        processors_before = dict(attention_processors(transformer))
        handle = diffattn.apply(pipe, config)
        transformer.enable_parallelism(config=cp)
    else:
        processors_before = dict(attention_processors(transformer))
        transformer.enable_parallelism(config=cp)
        handle = diffattn.apply(pipe, config)
    parallel = call()
    method = handle.method(diffattn.RadialAttentionConfig)
    layouts = sum(len(c.layouts) for c in method.caches.values())
    handle.remove()
    restored = all(attention_processors(transformer)[k] is v for k, v in processors_before.items())
    dense_parallel = call()  # the parallel model as it was: its own Ulysses path
    scale = float(dense.abs().max())  # latents are not in [0, 1]: differences are reported relative to their size
    report = {
        "case": case,
        "rank": dist.get_rank(),
        "radial_vs_single": float((parallel - single).abs().max()) / scale,
        "radial_vs_dense": float((parallel - dense).abs().max()) / scale,
        "dense_after_remove": float((dense_parallel - dense).abs().max()) / scale,
        "scale": scale,
        "layouts": layouts,
        "tokens_single": seen[1][0],  # the single-process radial call
        "tokens_parallel": seen[2][0],  # each rank's shard
        "processors": sorted({type(p).__name__ for p in attention_processors(transformer).values()}),
        "restored": restored,
    }
    # one write() of the whole line (< PIPE_BUF bytes, so atomic): the launch's processes share one stdout pipe
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), ("REPORT " + json.dumps(report) + "\n").encode())


if __name__ == "__main__":
    main()
