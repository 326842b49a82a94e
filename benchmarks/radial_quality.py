"""Does radial attention keep a video? Measured on `shapes-wan`, the trained Wan-architecture model, on held-out
prompts and seeds (CPU).

    python benchmarks/radial_quality.py                          # every part, 96 videos a variant (hours on a CPU)
    python benchmarks/radial_quality.py --parts fidelity --videos 32
    python benchmarks/radial_quality.py --parts fidelity --store runs/quality   # resumes where a stopped run was

Parts:

- fidelity: PSNR and SSIM of radial attention's video against the dense video from the same noise, at two decay
  factors, and of three baselines with exactly the radial mask's block count (so the same density) on the same
  layers and steps: a random block mask (diagonal and sink blocks kept), a local window (every frame pair gets the
  same spatial band: no decay with frame distance) and a temporal band (nearby frame pairs whole, nothing else).
  Means with 95% intervals (normal approximation), paired differences radial - baseline per video, and the video
  judge's scores (presence of each captioned object with its colour and shape in >= 90% of frames; direction).
- energy: the dense model's attention mass by temporal distance and by spatial distance within a frame, measured on
  every self-attention layer and step of dense sampling (a strided subset of queries), as JSON and a PNG.
- targets: the model itself against the issue's targets, dense at the preset's settings on held-out single-object
  prompts (`--target-videos`): the share kept (the object with its colour and shape in >= 90% of frames) and
  moving the captioned way, with 95% intervals.
- extension: trained at L frames, generated at 4L: dense and radial as they are, and each after a LoRA fine-tune at
  4L (`diffattn.training.train_radial_lora`, the same steps, rank and clips for both) on rendered clips, judged over
  the whole video (per video and paired: radial + LoRA - dense + LoRA), with each LoRA's training time, PSNR/SSIM
  of radial against dense from the same noise (before and after the LoRAs) and a picture of the four videos.

With `--store DIR`, every finished video (fidelity, extension) and LoRA adapter (extension, with its training time)
is kept in DIR under a key of the transformer's weights and every setting that shapes it; the same command again
reads those back and computes only what is missing, so a part of hours can run across sessions.

Baseline masks replace the radial mask in the method's mask cache, so they run through the same processors, kernel
and dense-step schedule as radial attention itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image, ImageDraw

import diffattn
from diffattn.adapters import WanSelfAttnProcessor, attention_processors
from diffattn.judge import judge_clip
from diffattn.kernels import BlockSparseLayout
from diffattn.loading import load_pipeline
from diffattn.methods.radial_attention import RadialAttentionConfig
from diffattn.methods.radial_mask import radial_block_mask
from diffattn.presets import PRESETS, preset_path
from diffattn.scenes import HELD_OUT_CLIP_SEED, render_clip
from diffattn.video_metrics import psnr, ssim


sys.path.insert(0, str(Path(__file__).parent))
from _report import RESULTS, device_name, write_report  # noqa: E402


MODEL = "shapes-wan"
PARTS = ("targets", "fidelity", "energy", "extension")
SECOND_DECAY = 1.0  # the other decay factor measured beside the preset's
BASELINES = ("random", "local", "temporal")
Z95 = 1.96


# ---- equal-density baseline masks -----------------------------------------------------------------------------


def _block_grid(num_frames: int, tokens_per_frame: int, block: int):
    """Per block pair: query frame, key frame and in-frame block indices. Needs whole blocks per frame."""
    if tokens_per_frame % block:
        raise ValueError(f"baselines need tokens_per_frame ({tokens_per_frame}) to be a multiple of block ({block})")
    per = tokens_per_frame // block
    index = torch.arange(num_frames * per)
    frame, inner = index // per, index % per
    return frame[:, None], frame[None, :], inner[:, None], inner[None, :]


def _fill_to(mask: torch.Tensor, candidates: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`mask` plus randomly chosen (seeded) `candidates` blocks until it holds exactly `count` blocks."""
    need = count - int(mask.sum())
    pool = (candidates & ~mask).flatten().nonzero().flatten()
    if need < 0 or need > len(pool):
        raise ValueError(f"cannot reach {count} blocks: {int(mask.sum())} kept, {len(pool)} candidates")
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:need]]
    out = mask.clone().flatten()
    out[pick] = True
    return out.view_as(mask)


def random_block_mask(num_frames: int, tokens_per_frame: int, block: int, count: int, *, sink_frames: int = 1,
                      seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Diagonal blocks and the sink frames' key blocks, then random blocks: exactly `count` blocks."""
    qf, kf, qi, ki = _block_grid(num_frames, tokens_per_frame, block)
    keep = ((qf == kf) & (qi == ki)) | (kf < sink_frames)
    return _fill_to(keep, torch.ones_like(keep), count, seed)


def local_window_mask(num_frames: int, tokens_per_frame: int, block: int, count: int, *, seed: int = 0):
    """The same spatial band |in-frame block offset| <= w for every frame pair (no decay with distance): the widest
    band under `count` blocks, topped up with random blocks of the next offset to exactly `count`."""
    qf, kf, qi, ki = _block_grid(num_frames, tokens_per_frame, block)
    offset = (qi - ki).abs().expand(len(qf.flatten()), -1)
    width = 0
    while int((offset <= width + 1).sum()) <= count and width + 1 <= offset.max():
        width += 1
    return _fill_to(offset <= width, offset == width + 1, count, seed)


def temporal_band_mask(num_frames: int, tokens_per_frame: int, block: int, count: int, *, seed: int = 0):
    """Frame pairs up to distance T whole, nothing else: the largest T under `count` blocks, topped up with random
    blocks of the pairs at distance T + 1 to exactly `count`."""
    qf, kf, _, _ = _block_grid(num_frames, tokens_per_frame, block)
    distance = (qf - kf).abs()
    reach = 0
    while int((distance <= reach + 1).sum()) <= count and reach + 1 < num_frames:
        reach += 1
    return _fill_to(distance <= reach, distance == reach + 1, count, seed)


def baseline_masks(radial: torch.Tensor, num_frames: int, tokens_per_frame: int, block: int, sink_frames: int):
    """{name: bool block mask} of the three baselines, each with exactly the radial mask's block count."""
    count = int(radial.sum())
    return {
        "random": random_block_mask(num_frames, tokens_per_frame, block, count, sink_frames=sink_frames),
        "local": local_window_mask(num_frames, tokens_per_frame, block, count),
        "temporal": temporal_band_mask(num_frames, tokens_per_frame, block, count),
    }


# ---- statistics -------------------------------------------------------------------------------------------------


def interval(values: list[float]) -> dict[str, float]:
    """Mean and its 95% interval (normal approximation) of per-video values."""
    mean = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


# ---- sampling ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    caption: str
    seed: int  # the noise seed; the caption comes from the held-out clip of the same index


def held_out_prompts(count: int, frames: int, *, first: int = 0, single_only: bool = False) -> list[Prompt]:
    """Captions of held-out clips (scenes.HELD_OUT_CLIP_SEED on), each with its own noise seed."""
    prompts, index = [], first
    while len(prompts) < count:
        clip = render_clip(HELD_OUT_CLIP_SEED + index, frames)
        if not single_only or len(clip.objects) == 1:
            prompts.append(Prompt(clip.caption, index))
        index += 1
    return prompts


def scheduler_setting(scheduler) -> dict | None:
    """A scheduler as a store key sees it: its class and public config (the shift sets every noise level)."""
    if scheduler is None:
        return None
    config = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
    return {"class": type(scheduler).__name__, **config}


def first_stores_scheduler() -> dict:
    """shapes-wan's sampler when the first stores were made (flow matching, shift 3): no key names it."""
    return scheduler_setting(FlowMatchEulerDiscreteScheduler(shift=3.0))


class VideoStore:
    """Finished videos on disk, so a run of hours that stops (a closed session, a killed job) resumes where it was.

    A video is found again only under the same setting: the model's weights (transformer, text encoder and
    autoencoder: a retrained decoder draws other frames from the same latents) and device, the scheduler (its shift
    sets the noise levels), the call (frames, steps, size, guidance), the variant (its name, its radial settings and
    its block mask) and the prompt (caption and noise seed). Files are written whole (a temporary name, then a
    rename), so a stop mid-write leaves nothing half-read.
    """

    def __init__(self, folder: Path, pipe, call: dict):
        self.folder = Path(folder)
        weights = hashlib.sha256()
        for part in ("transformer", "text_encoder", "vae"):
            module = getattr(pipe, part, None)
            if module is None:  # a pipeline without that part (a test's stand-in)
                continue
            for name, tensor in sorted(module.state_dict().items()):
                weights.update(f"{part}.{name}".encode())
                weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.base = {"weights": weights.hexdigest(), "call": call}
        scheduler = scheduler_setting(getattr(pipe, "scheduler", None))
        if scheduler not in (None, first_stores_scheduler()):  # the stores made so far keep their keys
            self.base["scheduler"] = scheduler
        device = pipe.transformer.device.type
        if device != "cpu":  # videos from another device differ in rounding; CPU keys stay as the first stores made
            self.base["device"] = device

    def variant(
        self,
        name: str,
        config: RadialAttentionConfig | None = None,
        mask: torch.Tensor | None = None,
        extra: dict | None = None,
    ) -> Path:
        """The folder of one variant's videos (or adapter) under this setting; `extra`: whatever else sets it apart
        (frame count, LoRA settings)."""
        setting = {
            **self.base,
            "variant": name,
            "config": dataclasses.asdict(config) if config else None,
            "mask": hashlib.sha256(mask.cpu().numpy().tobytes()).hexdigest() if mask is not None else None,
            **({"extra": extra} if extra is not None else {}),
        }
        key = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.folder / f"{name}-{key}"

    @staticmethod
    def path(folder: Path, prompt: Prompt) -> Path:
        return folder / f"{prompt.seed:07d}-{hashlib.sha256(prompt.caption.encode()).hexdigest()[:12]}.npy"

    @staticmethod
    def save(path: Path, video: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        np.save(partial, video)
        os.replace(partial, path)


def sample(
    pipe,
    prompts: list[Prompt],
    *,
    frames: int,
    steps: int,
    batch: int,
    defaults: dict,
    stored: Path | None = None,
    non_finite: list[int] | None = None,
) -> list[np.ndarray]:
    """Videos as uint8 [F, H, W, 3], one per prompt, each from its own seeded noise (batching changes nothing).

    With `stored` (a `VideoStore.variant` folder), videos already there are read back and each new one is saved
    as soon as its batch is done. A video with non-finite values (an overflow in half precision) keeps them as 0
    (black) and its prompt's seed is appended to `non_finite` when given, and logged: never silently."""
    videos: dict[int, np.ndarray] = {}
    if stored is not None:
        for i, prompt in enumerate(prompts):
            if VideoStore.path(stored, prompt).is_file():
                videos[i] = np.load(VideoStore.path(stored, prompt))
    todo = [i for i in range(len(prompts)) if i not in videos]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        out = pipe(
            prompt=[prompts[i].caption for i in chunk],
            generator=[torch.Generator().manual_seed(prompts[i].seed) for i in chunk],
            num_frames=frames,
            num_inference_steps=steps,
            output_type="np",
            **{k: v for k, v in defaults.items() if k != "num_frames"},
        ).frames
        for i, video in zip(chunk, out):
            video = np.asarray(video)
            if not np.isfinite(video).all():
                print(f"sample: the video of seed {prompts[i].seed} has non-finite values (kept as 0)", flush=True)
                if non_finite is not None:
                    non_finite.append(prompts[i].seed)
                video = np.nan_to_num(video, nan=0.0, posinf=0.0, neginf=0.0)
            videos[i] = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
            if stored is not None:
                VideoStore.save(VideoStore.path(stored, prompts[i]), videos[i])
    return [videos[i] for i in range(len(prompts))]


def timed_sample(pipe, prompts: list[Prompt], *, stored: Path | None, **call) -> tuple[list[np.ndarray], dict]:
    """`sample`, and its time: {"seconds", "videos_sampled", "non_finite_seeds"}, which cover only the videos sampled
    in this run (a resumed run reads the others back from `stored`)."""
    reused = sum(VideoStore.path(stored, p).is_file() for p in prompts) if stored else 0
    start = time.perf_counter()
    non_finite: list[int] = []
    videos = sample(pipe, prompts, stored=stored, non_finite=non_finite, **call)
    return videos, {"seconds": time.perf_counter() - start, "videos_sampled": len(prompts) - reused,
                    "non_finite_seeds": non_finite}  # fmt: skip


def training_counters(model: str) -> dict[str, int]:
    """The step counters of the weights `model` (a preset name or an exported folder) holds, from its
    training_state.json: which autoencoder, decoder and transformer a part measured (a decoder never trained on its
    own counts 0 steps)."""
    folder = preset_path(model) if model in PRESETS else Path(model)
    saved = json.loads((folder / "training_state.json").read_text())
    return {key: int(saved.get(key, 0)) for key in ("vae_step", "decoder_step", "denoiser_step")}


def latent_geometry(pipe, frames: int, height: int, width: int) -> tuple[int, int]:
    """(latent frames, tokens per frame) of a Wan pipeline's video."""
    pt, ph, pw = pipe.transformer.config.patch_size
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    per_frame = (height // pipe.vae_scale_factor_spatial // ph) * (width // pipe.vae_scale_factor_spatial // pw)
    return latent_frames // pt, per_frame


def with_mask(pipe, config: RadialAttentionConfig, mask: torch.Tensor | None, geometry: tuple[int, int]):
    """Apply radial attention; with `mask`, its block mask replaces the radial one for this geometry (same layers,
    steps and kernel). Returns the handle."""
    handle = diffattn.apply(pipe, config)
    if mask is not None:
        cache = handle.method(RadialAttentionConfig).cache
        device = pipe.transformer.device
        cache.layouts[(*geometry, str(device))] = BlockSparseLayout(mask.to(device), config.block_size)
    return handle


JUDGE_WORKERS = int(os.environ.get("DIFFATTN_JUDGE_WORKERS", "0"))  # processes judging videos (0: this one)


def judge_video(video: np.ndarray, caption: str) -> dict:
    """One video uint8 [F, H, W, 3]: every captioned object kept (colour and shape in >= 90% of frames) and moving
    the captioned way (its track; and its colour's track alone, as a detector of colour and motion reads it)."""
    verdicts = judge_clip([Image.fromarray(f) for f in video], caption)
    return {
        "objects": len(verdicts),
        "kept": all(v.kept for v in verdicts),
        "direction": all(v.moves_right for v in verdicts),
        "color_direction": all(v.color_moves_right for v in verdicts),
        "present": statistics.fmean(v.present for v in verdicts),
    }


def judge_videos(videos: list[np.ndarray], prompts: list[Prompt]) -> list[dict]:
    """`judge_video` of each, in order; with DIFFATTN_JUDGE_WORKERS=N in N forked processes (the judge is numpy
    and PIL only, so a process that holds CUDA can fork it)."""
    pairs = [(video, prompt.caption) for video, prompt in zip(videos, prompts)]
    if JUDGE_WORKERS <= 1 or len(pairs) < 2:
        return [judge_video(*pair) for pair in pairs]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(JUDGE_WORKERS) as pool:
        return pool.starmap(judge_video, pairs, chunksize=4)


def judge_summary(rows: list[dict]) -> dict[str, float]:
    """Shares of videos whose captioned objects are all kept / all move the captioned way; the same over the
    single-object videos (the issue's targets: kept in >= 85% of them, direction in >= 80%)."""
    single = [r for r in rows if r["objects"] == 1]
    return {
        "single_object_videos": len(single),
        "single_kept": statistics.fmean(r["kept"] for r in single) if single else math.nan,
        "single_direction": statistics.fmean(r["direction"] for r in single) if single else math.nan,
        "kept": statistics.fmean(r["kept"] for r in rows),
        "direction": statistics.fmean(r["direction"] for r in rows),
        "kept_and_direction": statistics.fmean(r["kept"] and r["direction"] for r in rows),
        "mean_presence": statistics.fmean(r["present"] for r in rows),
    }


# ---- the model against the targets ------------------------------------------------------------------------


TARGETS = {"kept": 0.85, "direction": 0.80}  # the issue's: shares of single-object videos


def targets(pipe, args, defaults: dict) -> dict:
    """Dense videos at the preset's settings on held-out single-object prompts, judged: shares kept / direction."""
    frames = defaults["num_frames"]
    prompts = held_out_prompts(args.target_videos, frames, single_only=True)
    rows = judge_videos(sample(pipe, prompts, frames=frames, steps=args.steps, batch=args.batch, defaults=defaults),
                        prompts)  # fmt: skip
    return {
        "videos": len(rows),
        "kept": interval([float(r["kept"]) for r in rows]),
        "direction": interval([float(r["direction"]) for r in rows]),
        "color_direction": interval([float(r["color_direction"]) for r in rows]),
        "presence": interval([r["present"] for r in rows]),
        "targets": dict(TARGETS),
        "rows": [{"caption": p.caption, "seed": p.seed, **r} for p, r in zip(prompts, rows)],
    }


# ---- part 1: fidelity -------------------------------------------------------------------------------------------


def wan_sink_frames(config: RadialAttentionConfig) -> int:
    """The config's sink frames, None resolved to the Wan family's default (1) as the method resolves it."""
    return 1 if config.sink_frames is None else config.sink_frames


def fidelity(
    pipe, preset_radial: RadialAttentionConfig, args, defaults: dict, store: VideoStore | None = None
) -> tuple[dict, dict]:
    frames, steps = defaults["num_frames"], args.steps
    geometry = latent_geometry(pipe, frames, defaults["height"], defaults["width"])
    prompts = held_out_prompts(args.videos, frames)
    sink = wan_sink_frames(preset_radial)
    decays = [preset_radial.decay_factor, SECOND_DECAY]
    radial_masks = {
        f"radial-{d:g}": radial_block_mask(
            *geometry,
            block_size=preset_radial.block_size,
            decay_factor=d,
            sink_frames=sink,
            dense_neighbor_frames=preset_radial.dense_neighbor_frames,
        )  # fmt: skip
        for d in decays
    }
    main = f"radial-{decays[0]:g}"
    masks = {**radial_masks, **baseline_masks(radial_masks[main], *geometry, preset_radial.block_size, sink)}
    timings, videos = {}, {}

    def run(name: str, stored: Path | None) -> None:
        videos[name], timings[name] = timed_sample(pipe, prompts, frames=frames, steps=steps, batch=args.batch,
                                                   defaults=defaults, stored=stored)  # fmt: skip
        print(f"fidelity: {name} done ({timings[name]})", flush=True)

    run("dense", store.variant("dense") if store else None)
    for name, mask in masks.items():
        config = preset_radial
        if name.startswith("radial-"):
            config = dataclasses.replace(preset_radial, decay_factor=float(name[len("radial-") :]))
        handle = with_mask(pipe, config, None if name.startswith("radial-") else mask, geometry)
        try:
            run(name, store.variant(name, config, mask) if store else None)
        finally:
            handle.remove()
    per_video = {
        name: {"psnr": [psnr(v, d) for v, d in zip(videos[name], videos["dense"])],
               "ssim": [ssim(v, d) for v, d in zip(videos[name], videos["dense"])]}
        for name in masks
    }  # fmt: skip
    judged = {name: judge_videos(vids, prompts) for name, vids in videos.items()}
    report = {
        "prompts": len(prompts),
        "frames": frames,
        "steps": steps,
        "latent_geometry": {"frames": geometry[0], "tokens_per_frame": geometry[1]},
        "radial": dataclasses.asdict(preset_radial),
        "variants": {
            name: {
                "density": float(mask.float().mean()),
                "blocks": int(mask.sum()),
                "psnr": interval(per_video[name]["psnr"]),
                "ssim": interval(per_video[name]["ssim"]),
                "judge": judge_summary(judged[name]),
                "sampling": timings[name],
            }
            for name, mask in masks.items()
        },
        "dense": {"judge": judge_summary(judged["dense"]), "sampling": timings["dense"]},
        "paired_psnr_difference": {
            f"{main} - {other}": interval([a - b for a, b in zip(per_video[main]["psnr"], per_video[other]["psnr"])])
            for other in masks
            if other != main
        },
        "paired_ssim_difference": {
            f"{main} - {other}": interval([a - b for a, b in zip(per_video[main]["ssim"], per_video[other]["ssim"])])
            for other in masks
            if other != main
        },
    }
    return report, {"prompts": prompts, "videos": videos, "masks": masks}


# ---- part 2: attention energy -----------------------------------------------------------------------------------


class EnergyRecorder:
    """Attention mass of every `stride`-th video query by (frame distance, spatial distance) of its keys.

    Spatial distance is the Euclidean distance between the query's and the key's positions in the latent grid,
    rounded to an integer. `mass[d, r]` sums probabilities over calls (layers x steps x batch x heads averaged per
    query); `keys[d, r]` counts the keys there, so mass / keys is the mass one key receives.
    """

    def __init__(self, frames: int, height: int, width: int, stride: int = 7):
        self.frames, self.height, self.width = frames, height, width
        n = frames * height * width
        self.queries = torch.arange(0, n, stride)
        pos = torch.arange(n)
        f, y, x = pos // (height * width), (pos // width) % height, pos % width
        qf, qy, qx = f[self.queries, None], y[self.queries, None], x[self.queries, None]
        distance = (qf - f[None]).abs()
        radius = ((qy - y[None]) ** 2 + (qx - x[None]) ** 2).double().sqrt().round().long()
        self.radii = int(radius.max()) + 1
        self.bucket = (distance * self.radii + radius).flatten()
        size = frames * self.radii
        self.keys = torch.zeros(size, dtype=torch.float64).index_add_(
            0, self.bucket, torch.ones(len(self.bucket), dtype=torch.float64)
        )
        self.mass = torch.zeros(size, dtype=torch.float64)
        self.calls = 0

    def record(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """query, key: [B, N, H, D] (after norms and rotary embeddings)."""
        q = query[:, self.queries].transpose(1, 2).float()  # [B, H, Q, D]
        k = key.transpose(1, 2).float()
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [B, H, Q, N]
        self.mass.index_add_(0, self.bucket, probs.mean((0, 1)).flatten().double().cpu())
        self.calls += 1

    def tables(self) -> dict:
        mass = self.mass.view(self.frames, self.radii) / max(self.calls, 1) / len(self.queries)  # per query
        keys = self.keys.view(self.frames, self.radii) / len(self.queries)
        per_key = torch.where(keys > 0, mass / keys.clamp_min(1e-12), torch.zeros_like(mass))
        temporal_mass = mass.sum(1)
        temporal_per_key = temporal_mass / keys.sum(1)
        return {
            "temporal_distance": list(range(self.frames)),
            "temporal_mass": temporal_mass.tolist(),
            "temporal_mass_per_key": temporal_per_key.tolist(),
            "spatial_distance": list(range(self.radii)),
            "spatial_mass_same_frame": mass[0].tolist(),
            "spatial_mass_per_key_by_frame_distance": per_key.tolist(),
            "calls": self.calls,
            "queries_per_call": len(self.queries),
        }


class _RecordingWanProcessor(WanSelfAttnProcessor):
    def __init__(self, recorder: EnergyRecorder):
        self.recorder = recorder

    def attend(self, attn, query, key, value):
        self.recorder.record(query, key)
        return super().attend(attn, query, key, value)


def energy(pipe, args, defaults: dict) -> dict:
    frames = defaults["num_frames"]
    latent_frames, _ = latent_geometry(pipe, frames, defaults["height"], defaults["width"])
    ph, pw = pipe.transformer.config.patch_size[1:]
    side_h = defaults["height"] // pipe.vae_scale_factor_spatial // ph
    side_w = defaults["width"] // pipe.vae_scale_factor_spatial // pw
    recorder = EnergyRecorder(latent_frames, side_h, side_w)
    transformer = pipe.transformer
    originals = attention_processors(transformer)
    recording = {key: _RecordingWanProcessor(recorder) if key.endswith("attn1.processor") else proc
                 for key, proc in originals.items()}  # fmt: skip
    transformer.set_attn_processor(recording)
    try:
        sample(pipe, held_out_prompts(args.energy_videos, frames, first=10**6), frames=frames, steps=args.steps,
               batch=args.batch, defaults=defaults)  # fmt: skip
    finally:
        transformer.set_attn_processor(originals)
    return {"videos": args.energy_videos, **recorder.tables()}


def plot_energy(tables: dict, path: Path) -> None:
    """Two panels: mass per key against frame distance; against spatial distance for several frame distances."""
    width, height, pad = 460, 300, 44
    image = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(image)
    per_key = tables["spatial_mass_per_key_by_frame_distance"]
    curves = [
        ("mass per key vs frame distance", [tables["temporal_mass_per_key"]], ["all keys"]),
        ("mass per key vs spatial distance",
         [per_key[d] for d in (0, 1, 2, 4, 8) if d < len(per_key)],
         [f"frame distance {d}" for d in (0, 1, 2, 4, 8) if d < len(per_key)]),
    ]  # fmt: skip
    colours = [(30, 30, 30), (200, 40, 40), (40, 120, 200), (40, 160, 60), (150, 60, 170)]
    for panel, (title, series, labels) in enumerate(curves):
        x0 = panel * width
        values = [v for s in series for v in s if v > 0]
        low, high = math.log10(min(values)), math.log10(max(values))
        span = max(high - low, 1e-9)
        length = max(len(s) for s in series) - 1
        draw.text((x0 + pad, 6), title + " (log scale)", fill="black")
        draw.rectangle([x0 + pad, pad, x0 + width - 12, height - pad], outline=(120, 120, 120))
        draw.text((x0 + 4, pad - 4), f"{10**high:.2e}", fill="black")
        draw.text((x0 + 4, height - pad - 8), f"{10**low:.2e}", fill="black")
        draw.text((x0 + pad, height - pad + 6), "0", fill="black")
        draw.text((x0 + width - 30, height - pad + 6), str(length), fill="black")
        for index, (values_, label) in enumerate(zip(series, labels)):
            points = [
                (x0 + pad + (width - 12 - pad) * i / max(length, 1),
                 height - pad - (height - 2 * pad) * (math.log10(v) - low) / span)
                for i, v in enumerate(values_) if v > 0
            ]  # fmt: skip
            draw.line(points, fill=colours[index % len(colours)], width=2)
            draw.text((x0 + width - 150, pad + 6 + 12 * index), label, fill=colours[index % len(colours)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---- part 3: length extension ------------------------------------------------------------------------------------


def write_clips(folder: Path, count: int, frames: int, first: int, pipe) -> None:
    """Rendered training clips for the LoRA fine-tunes, from a stream no evaluation uses: each clip's latents (the
    pipeline's VAE on the exact rendered frames: train-lora's cached-latent input, no video codec in between) and
    its caption (.txt)."""
    from safetensors.torch import save_file

    from diffattn.shapes_video_training import clip_batch
    from diffattn.training import encode_video

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        video, (caption,) = clip_batch(first + index, 1, frames)  # [1, 3, F, H, W] in [-1, 1]
        with torch.no_grad():
            latents = encode_video(pipe, video)
        save_file({"latents": latents.float().cpu().contiguous()}, str(folder / f"clip{index:04d}.safetensors"))
        (folder / f"clip{index:04d}.txt").write_text(caption)


def extension(
    pipe, preset_radial: RadialAttentionConfig, args, defaults: dict, store: VideoStore | None = None
) -> dict:
    frames = 4 * (defaults["num_frames"] - 1) + 1
    geometry = latent_geometry(pipe, frames, defaults["height"], defaults["width"])
    prompts = held_out_prompts(args.extension_videos, frames, first=2 * 10**6)
    sparse = dataclasses.replace(preset_radial, dense_layers=0, dense_timesteps=0)
    mask = radial_block_mask(*geometry, block_size=sparse.block_size, decay_factor=sparse.decay_factor,
                             sink_frames=wan_sink_frames(sparse),
                             dense_neighbor_frames=sparse.dense_neighbor_frames)  # fmt: skip
    report = {"frames": frames, "latent_geometry": list(geometry), "prompts": len(prompts), "steps": args.steps,
              "radial": dataclasses.asdict(preset_radial), "radial_density": float(mask.float().mean()),
              "lora_settings": {"steps": args.lora_steps, "rank": args.lora_rank, "lr": args.lora_lr,
                                "clips": args.lora_clips, "clip_frames": frames},
              "lora": {}, "variants": {}}  # fmt: skip
    videos, judged = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters, settings = {}, {}
        for name, radial in (("dense", None), ("radial", sparse)):
            settings[name] = {
                "frames": frames,
                "steps": args.lora_steps,
                "rank": args.lora_rank,
                "lr": args.lora_lr,
                "clips": args.lora_clips,
                "radial": dataclasses.asdict(radial) if radial else None,
            }
            folder = store.variant(f"extension-lora-{name}", extra=settings[name]) if store else Path(tmp) / name
            report["lora"][name] = train_lora_once(pipe, folder, Path(tmp) / "clips", radial, args, defaults, frames)
            adapters[name] = folder
        dense_lora, radial_lora = report["lora"]["dense"], report["lora"]["radial"]
        report["lora"]["radial_over_dense_time"] = radial_lora["seconds"] / dense_lora["seconds"]
        if "median_step_seconds" in dense_lora and "median_step_seconds" in radial_lora:  # stores made before lack it
            report["lora"]["radial_over_dense_median_step"] = (
                radial_lora["median_step_seconds"] / dense_lora["median_step_seconds"]
            )
        for name, lora, attention in (
            ("dense", None, None),
            ("radial", None, preset_radial),
            ("dense+lora", "dense", None),
            ("radial+lora", "radial", preset_radial),
        ):
            stored = None
            if store is not None:
                extra = {"frames": frames, "lora": settings[lora] if lora else None}
                stored = store.variant(f"extension-{name}", attention, extra=extra)
            if lora is not None:
                pipe.load_lora_weights(adapters[lora])
            handle = diffattn.apply(pipe, attention) if attention is not None else None
            try:
                sampled, sampling = timed_sample(pipe, prompts, frames=frames, steps=args.steps, batch=args.batch,
                                                 defaults=defaults, stored=stored)  # fmt: skip
            finally:
                if handle is not None:
                    handle.remove()
                if lora is not None:
                    pipe.unload_lora_weights()
            videos[name], judged[name] = sampled, judge_videos(sampled, prompts)
            report["variants"][name] = {"judge": judge_summary(judged[name]),
                                        "presence": interval([r["present"] for r in judged[name]]),
                                        "sampling": sampling,
                                        "rows": [{"caption": p.caption, "seed": p.seed, **r}
                                                 for p, r in zip(prompts, judged[name])]}  # fmt: skip
            print(f"extension: {name} done ({sampling})", flush=True)
    report.update(extension_comparisons(videos, judged))
    return report, {"prompts": prompts, "videos": videos}


def extension_comparisons(videos: dict[str, list[np.ndarray]], judged: dict[str, list[dict]]) -> dict:
    """Radial against dense from the same noise (PSNR, SSIM), before and after the LoRAs, and per-video paired
    differences of the judge's verdicts (kept, direction: 0/1; present: share of frames) between the variants."""
    return {
        "radial_vs_dense": {
            f"{radial} vs {dense}": {
                "psnr": interval([psnr(a, b) for a, b in zip(videos[radial], videos[dense])]),
                "ssim": interval([ssim(a, b) for a, b in zip(videos[radial], videos[dense])]),
            }
            for radial, dense in (("radial", "dense"), ("radial+lora", "dense+lora"))
        },  # fmt: skip
        "paired_judge_difference": {
            f"{a} - {b}": {
                field: interval([float(x[field]) - float(y[field]) for x, y in zip(judged[a], judged[b])])
                for field in ("kept", "direction", "present")
            }
            for a, b in (("radial+lora", "dense+lora"), ("dense+lora", "dense"), ("radial+lora", "radial"))
        },
    }


def train_lora_once(pipe, folder: Path, clips: Path, radial, args, defaults: dict, frames: int) -> dict:
    """A LoRA fine-tune at `frames` into `folder` with its time in training.json, or, when `folder` already holds a
    finished one (a resumed run with --store), that one's record. The adapter lands whole: it is trained in a
    sibling folder and renamed when done."""
    from diffattn.training import train_radial_lora

    record = folder / "training.json"
    if record.is_file():
        return json.loads(record.read_text())
    if not clips.is_dir():
        write_clips(clips, args.lora_clips, frames, first=HELD_OUT_CLIP_SEED - 10**6, pipe=pipe)
    partial = folder.with_name(folder.name + ".partial")
    start = time.perf_counter()
    summary = train_radial_lora(
        args.model, clips, partial, steps=args.lora_steps, rank=args.lora_rank, learning_rate=args.lora_lr,
        num_frames=frames, height=defaults["height"], width=defaults["width"],
        max_sequence_length=defaults.get("max_sequence_length", 32), radial=radial, dense=radial is None,
        pipe=pipe, overwrite=True,
    )  # fmt: skip
    # a resumed run reports this record: its time is of the run that trained it (when, on what: below)
    result = {"seconds": time.perf_counter() - start, "steps": args.lora_steps, "rank": args.lora_rank,
              "median_step_seconds": statistics.median(summary["step_seconds"]),
              "final_loss": summary["losses"][-1], "trained": time.strftime("%Y-%m-%d %H:%M"),
              "device": device_name(pipe.transformer.device.type)}  # fmt: skip
    _remove_adapters(pipe)
    (partial / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    if folder.exists():  # an earlier run's folder without its record: not a finished adapter
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return result


def _remove_adapters(pipe) -> None:
    """The training's peft layers off the transformer (the adapters are on disk), so the next run starts clean."""
    pipe.transformer.delete_adapters(pipe.transformer.active_adapters())


# ---- report -----------------------------------------------------------------------------------------------------


def side_by_side(videos: dict, index: int, path: Path, names: list[str], every: int = 4) -> None:
    """Rows of frames (every `every`-th) of one prompt: one row per variant."""
    rows = [np.concatenate(list(videos[name][index][::every]), axis=1) for name in names]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="shapes-wan or a folder of an exported shapes-wan pipeline")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--videos", type=int, default=96, help="held-out videos per fidelity variant (96)")
    parser.add_argument("--target-videos", type=int, default=96, help="single-object videos the targets part judges")
    parser.add_argument("--energy-videos", type=int, default=8, help="dense videos the energy is measured on (8)")
    parser.add_argument("--extension-videos", type=int, default=96, help="held-out videos per extension variant")
    parser.add_argument("--lora-clips", type=int, default=64, help="rendered 4L clips the LoRAs train on (64)")
    parser.add_argument("--lora-steps", type=int, default=200, help="LoRA steps, the same for dense and radial")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (the preset's)")
    parser.add_argument("--batch", type=int, default=8, help="videos per pipeline call")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/...); its pictures go beside it, in radial_quality/",
    )
    parser.add_argument("--device", default="cpu", help="cpu (the issue's setting) or cuda (a lent GPU)")
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="folder that keeps the finished videos (fidelity, extension) and LoRA adapters (extension), so a stopped "
        "run resumes there (the same command again); each is reused only under the same weights and settings",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[MODEL]
    args.steps = args.steps or preset.steps
    defaults = dict(preset.call_defaults)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    preset_radial = preset.radial
    # built before any LoRA is added: the key is the base model's weights
    store = VideoStore(args.store, pipe, {**defaults, "steps": args.steps}) if args.store else None
    fields: dict = {"model": args.model, "steps": args.steps, "call": defaults}
    # beside the JSON: a run with --out elsewhere (a trial, a partial run) leaves the committed pictures alone
    pictures = (args.out.parent if args.out else RESULTS) / "radial_quality"
    pictures.mkdir(parents=True, exist_ok=True)
    if "targets" in args.parts:
        fields["targets"] = targets(pipe, args, defaults)
    if "energy" in args.parts:
        fields["energy"] = energy(pipe, args, defaults)
        plot_energy(fields["energy"], pictures / "energy_decay.png")
    if "fidelity" in args.parts:
        fields["fidelity"], kept = fidelity(pipe, preset_radial, args, defaults, store)
        names = ["dense", *kept["masks"]]
        side_by_side(kept["videos"], 0, pictures / "dense_vs_radial.png", names)
        fields["fidelity"]["picture"] = {"file": "radial_quality/dense_vs_radial.png", "rows": names,
                                         "prompt": kept["prompts"][0].caption}  # fmt: skip
    if "extension" in args.parts:
        fields["extension"], kept = extension(pipe, preset_radial, args, defaults, store)
        names = list(kept["videos"])
        side_by_side(kept["videos"], 0, pictures / "extension.png", names, every=8)
        fields["extension"]["picture"] = {"file": "radial_quality/extension.png", "rows": names,
                                          "prompt": kept["prompts"][0].caption}  # fmt: skip
    weights, scheduler = training_counters(args.model), scheduler_setting(pipe.scheduler)
    for part in args.parts:  # parts are often measured apart and merged: each says which weights and sampler it used
        fields[part]["weights"] = weights
        fields[part]["scheduler"] = {"class": scheduler["class"], "shift": scheduler.get("shift")}
    write_report("radial_quality", args.device, fields, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
