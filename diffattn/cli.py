"""The `diffattn` command.

    diffattn generate --model tiny-sd --prompt "a red cat" --steps 4 --seed 0 --out outputs/gen
    diffattn batch prompts.jsonl --out outputs/job --seeds 0 1 2   # a batch job (resumable)
    accelerate launch -m diffattn batch prompts.jsonl --out outputs/job   # the same job on every GPU / machine
    diffattn demo                       # every preset, offline, report in outputs/demo/index.html
    diffattn presets                    # list the offline presets
    diffattn train-lora --data clips/ --out lora/   # LoRA fine-tuning with radial attention (Wan)

Bad arguments print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from .kernels.block_sparse_attention import BACKENDS
from .methods.agent_attention import AgentAttentionConfig
from .methods.ir_diffusion import IRDiffusionConfig
from .methods.radial_attention import DEFAULT_SINK_FRAMES, RadialAttentionConfig
from .methods.radial_mask import BLOCK_SIZES
from .outputs import DEFAULT_FPS
from .presets import DEFAULT_PRESET, DEFAULT_VIDEO_PRESET, PRESETS
from .presets.shapes_video import (
    ATTENTION_HEADS,
    DEFAULT_ATTENTION_HEADS,
    FFN_DIM,
    INNER_DIM,
    NUM_FRAMES,
    NUM_LAYERS,
    WIDTH_STEP,
)
from .scenes import SPEEDS
from .shapes_training import ShapesTrainingConfig
from .shapes_video_training import ShapesVideoTrainingConfig


EXIT_USAGE = 2
logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) and exits with code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _int_at_least(low: int, what: str):
    """An argparse type: an int >= low, with a one-line message naming what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _default(config_class: type, field: str):
    """A config dataclass field's default: the one source of a trainer flag's default and of its --help text."""
    found = {f.name: f for f in dataclasses.fields(config_class)}[field]
    return found.default_factory() if found.default is dataclasses.MISSING else found.default


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _seed(text: str) -> int:
    """An argparse type: a seed, refused with the validation layer's own message."""
    from .validation import check_seed

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed={text!r} is not allowed: expected an int seed in [0, 2^63)") from None
    try:
        return check_seed("seed", value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# Commands that do one job in one process (their training is not distributed; the demo writes one report).
ONE_PROCESS_COMMANDS = ("train-lora", "train-shapes", "train-shapes-video", "demo")


def _add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="weights dtype (default: float32 on the CPU, the saved one on a GPU)")  # fmt: skip


def _add_training_run(parser: argparse.ArgumentParser, config: type) -> None:
    """The options every from-scratch training command shares: its run folder, seed, checkpoints, device, budget;
    their defaults are `config`'s (the command's training config dataclass)."""
    parser.add_argument("--out", "-o", required=True, type=Path, help="run folder (checkpoint, log, pipeline)")
    parser.add_argument("--seed", type=_seed, default=_default(config, "seed"),
                        help=f"seed of the weights and the data stream ({_default(config, 'seed')})")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=_positive_int, default=_default(config, "checkpoint_every"),
                        help=f"steps between checkpoints ({_default(config, 'checkpoint_every')})")  # fmt: skip
    parser.add_argument("--workers", type=_nonnegative_int, default=_default(config, "num_workers"),
                        help="processes rendering the training data ahead of the step "
                        f"({_default(config, 'num_workers')})")  # fmt: skip
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint (it is overwritten)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock budget: stop there, checkpoint and export (resume later)")  # fmt: skip
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from an exported pipeline folder "
                             "(e.g. the one kept in the repository)")  # fmt: skip
    parser.add_argument("--ema-decay", type=float, default=_default(config, "ema_decay"),
                        help="moving average of the trained weights, which is what is exported (0: off; "
                        f"{_default(config, 'ema_decay')})")  # fmt: skip


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limits", nargs="+", default=None, metavar="NAME=INT",
                        help="raise or lower the size limits, e.g. max_frames=2048 max_steps=5000 (names: diffattn."
                        "Limits; also the DIFFATTN_LIMITS environment variable)")  # fmt: skip


def _limits(args: argparse.Namespace):
    from .limits import Limits

    base = Limits.from_env()
    return base if args.limits is None else Limits.parse(args.limits, base)


def _preset_steps() -> str:
    """The presets' step counts for --help, grouped: '20 for shapes-sd, shapes-wan; 4 for tiny-sd, ...'."""
    by_steps: dict[int, list[str]] = {}
    for name, preset in PRESETS.items():
        by_steps.setdefault(preset.steps, []).append(name)
    return "; ".join(f"{steps} for {', '.join(names)}" for steps, names in by_steps.items())


def _radial_default(field: str) -> str:
    """A radial setting's default for --help: the library's, and each preset's own where it differs."""
    library = getattr(RadialAttentionConfig(), field)
    own = [f"{name} {getattr(preset.radial, field)}" for name, preset in PRESETS.items()
           if preset.radial is not None and getattr(preset.radial, field) != library]  # fmt: skip
    return f"default {library}; {', '.join(own)}" if own else f"default {library}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffattn", description="Attention control and acceleration for diffusers pipelines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = sub.add_parser(
        "generate",
        help="generate images or a video with one model",
        description=(
            "Generate with a preset, a local diffusers folder or a hub id. Images are saved as PNG; videos as MP4 "
            "with the `video` extra, else as PNG frames. Existing files are never overwritten."
        ),
    )
    gen.add_argument(
        "--model",
        "-m",
        default=None,
        help=f"preset ({', '.join(PRESETS)}), local folder or hub id (default: {DEFAULT_PRESET}; "
        f"{DEFAULT_VIDEO_PRESET} with --radial or --num-frames)",
    )
    gen.add_argument("--prompt", "-p", default=None, help="text prompt (required unless --request)")
    gen.add_argument("--request", type=Path, default=None, metavar="JSON",
                     help="run a recorded request: a GenerationRequest as JSON, or a batch manifest record (one "
                          "line of manifest-rank*.jsonl) holding one; the other generation flags are then not "
                          "allowed")  # fmt: skip
    gen.add_argument("--negative-prompt", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=None,
                     help=f"denoising steps (default: the preset's, {_preset_steps()}; 30 otherwise)")  # fmt: skip
    gen.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    gen.add_argument("--guidance-interval", type=float, nargs=2, metavar=("START", "STOP"), default=None,
                     help="guide only the steps in this fraction of the run, e.g. 0.3 1 "
                          "(default: every step)")  # fmt: skip
    gen.add_argument("--height", type=int, default=None, help="height in pixels")
    gen.add_argument("--width", type=int, default=None, help="width in pixels")
    gen.add_argument("--num-frames", type=int, default=None, help="frames (video models)")
    _add_dtype(gen)
    gen.add_argument(
        "--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available, else cpu)"
    )
    gen.add_argument("--context-parallel", type=int, default=None, metavar="N",
                     help="shard one video over N processes (launch with torchrun --nproc-per-node N -m diffattn "
                     "generate ...; Ulysses, on diffusers' engine)")  # fmt: skip
    gen.add_argument("--ring", action="store_true", help="with --context-parallel: ring attention instead of Ulysses")
    gen.add_argument("--fps", type=_positive_int, default=None,
                     help=f"frames per second of the saved video (video models; default {DEFAULT_FPS})")  # fmt: skip
    gen.add_argument("--no-maps", action="store_true", help="do not record and save attention-map heatmaps")
    agent = gen.add_argument_group("agent attention / token merging (Stable Diffusion UNets)")
    agent.add_argument("--agent", action="store_true", help="AgentSD: token merging plus agent attention")
    agent.add_argument("--tome", action="store_true", help="plain token merging (tomesd's method)")
    agent.add_argument("--merge-ratio", type=float, default=None,
                       help=f"fraction of tokens merged (default: {AgentAttentionConfig().ratio:g} with --agent, "
                       f"{AgentAttentionConfig.tome().ratio:g} with --tome)")  # fmt: skip
    structured = gen.add_argument_group("cross-attention editing (Stable Diffusion UNets)")
    structured.add_argument("--structured", action="store_true", help="noun-phrase-aware cross-attention")
    structured.add_argument("--conjunction", action="store_true", help="with --structured: conjunction mode")
    structured.add_argument("--phrase", action="append", default=None, help="a noun phrase to use (repeatable)")
    structured.add_argument(
        "--astar", nargs="?", const="astar", choices=["astar", "attend_and_excite", "both"], default=None,
        help="A-STAR latent updates (optionally the Attend-and-Excite loss, or both)",
    )  # fmt: skip
    ir = gen.add_argument_group("IR-Diffusion: consistent subjects in a scene (Stable Diffusion UNets)")
    ir.add_argument("--subject", action="append", default=None, metavar="PROMPT",
                    help="a subject's own prompt, e.g. 'a red circle' (repeat per subject); "
                         "runs IR-Diffusion")  # fmt: skip
    ir.add_argument("--ir-masks", choices=["auto", "attention", "segmenter"], default=None,
                    help="where subject masks come from (auto: the model's segmenter, else attention)")  # fmt: skip
    ir.add_argument(
        "--mask-dropout",
        type=float,
        default=None,
        help=f"IR-Diffusion query-mask dropout ({IRDiffusionConfig.mask_dropout:g})",
    )
    radial = gen.add_argument_group("radial attention (video models)")
    radial.add_argument("--radial", action="store_true", help="apply radial attention to the video self-attention")
    radial.add_argument("--decay-factor", type=float, default=None,
                        help=f"band width factor lambda ({_radial_default('decay_factor')})")  # fmt: skip
    radial.add_argument("--dense-timesteps", type=_nonnegative_int, default=None,
                        help=f"first steps kept dense ({_radial_default('dense_timesteps')})")  # fmt: skip
    radial.add_argument("--dense-last-timesteps", type=_nonnegative_int, default=None,
                        help=f"last steps dense ({_radial_default('dense_last_timesteps')})")  # fmt: skip
    radial.add_argument("--dense-layers", type=_nonnegative_int, default=None,
                        help=f"first layers kept dense ({_radial_default('dense_layers')})")  # fmt: skip
    radial.add_argument("--block-size", type=int, choices=list(BLOCK_SIZES), default=None,
                        help=f"kernel tile ({_radial_default('block_size')})")  # fmt: skip
    radial.add_argument("--sink-frames", type=_nonnegative_int, default=None,
                        help="attention-sink frames (default: the model family's: "
                        f"{', '.join(f'{family} {n}' for family, n in DEFAULT_SINK_FRAMES.items())})")  # fmt: skip
    radial.add_argument("--dense-neighbor-frames", type=_nonnegative_int, default=None,
                        help=f"frame pairs this close stay whole ({_radial_default('dense_neighbor_frames')}; 0: the "
                        "band decays from the first neighbour)")  # fmt: skip
    radial.add_argument(
        "--attention-backend",
        choices=list(BACKENDS),
        default=None,
        help=f"block-sparse backend ({_radial_default('backend')}: triton on CUDA in fp16/bf16, flex in fp32, "
        "gather on the CPU; torch: the "
        "masked reference)",
    )
    gen.add_argument("--out", "-o", type=Path, default=Path("outputs/generate"), help="output folder")
    _add_limits(gen)

    batch = sub.add_parser(
        "batch",
        help="run a batch job: a file of prompts, one output per prompt and seed (resumable, multi-GPU)",
        description=(
            "Generate every line of JOB (.jsonl: one JSON object per line with `prompt` and optional name, seed(s), "
            "model, steps, size and methods, see diffattn.jobs; other files: one prompt per line) into OUT. "
            "Under `accelerate launch -m diffattn batch ...` the work is split over all processes. Finished outputs "
            "are recorded in OUT/manifest-rank*.jsonl; rerunning the same job skips them. Nothing is overwritten."
        ),
    )
    batch.add_argument("job", type=Path, help="job file (.jsonl or one prompt per line)")
    batch.add_argument("--out", "-o", type=Path, required=True, help="output folder (resumes a job already there)")
    batch.add_argument(
        "--model", "-m", default=DEFAULT_PRESET, help=f"model of lines that name none ({DEFAULT_PRESET})"
    )
    batch.add_argument("--steps", type=_positive_int, default=None, help="steps of lines that name none")
    batch.add_argument("--seeds", type=_seed, nargs="+", default=[0], help="seeds of lines that name none (0)")
    batch.add_argument("--maps", action="store_true", help="also save attention-map heatmaps (SD-family models)")
    batch.add_argument("--batch-size", type=_positive_int, default=1,
                       help="prompts per pipeline call, for lines with the same settings (default: 1)")  # fmt: skip
    _add_dtype(batch)
    batch.add_argument("--device", default=None, help="torch device (default: this process's accelerate device)")
    batch.add_argument("--context-parallel", type=int, default=None, metavar="K",
                       help="groups of K processes, each making one video at a time "
                            "with context parallelism")  # fmt: skip
    _add_limits(batch)

    demo = sub.add_parser(
        "demo",
        help="run every preset offline and write outputs/demo/index.html",
        description="Run every tiny preset offline; write outputs, heatmaps and timings as HTML.",
    )
    demo.add_argument("--out", "-o", type=Path, default=Path("outputs/demo"), help="report folder")
    demo.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: each preset's)")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    demo.add_argument("--presets", nargs="+", choices=list(PRESETS), default=None, help="subset of presets")

    train = sub.add_parser(
        "train-lora",
        help="fine-tune LoRA adapters with radial attention active (Wan)",
        description="Fine-tune peft LoRA adapters on the attention projections of a Wan video transformer with "
        "radial attention active, from a folder of clips (videos or cached .safetensors latents, each with a .txt "
        "caption). The adapters load with pipe.load_lora_weights(OUT).",
    )
    train.add_argument("--model", "-m", default="tiny-wan", help="preset, local folder or hub id (default: tiny-wan)")
    train.add_argument("--data", required=True, type=Path, help="folder of clips with .txt captions")
    train.add_argument("--out", "-o", required=True, type=Path, help="where the adapters are saved")
    train.add_argument("--steps", type=_positive_int, default=100, help="optimizer steps (default: 100)")
    train.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank (default: 16)")
    train.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    train.add_argument("--batch-size", type=_positive_int, default=1, help="clips per step (default: 1)")
    train.add_argument("--num-frames", type=_positive_int, default=33, help="frames read from each video")
    train.add_argument("--height", type=_positive_int, default=128, help="training height in pixels")
    train.add_argument("--width", type=_positive_int, default=128, help="training width in pixels")
    train.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--overwrite", action="store_true", help="replace adapters already in --out")
    train.add_argument("--decay-factor", type=float, default=None,
                       help=f"radial band width factor ({_radial_default('decay_factor')})")  # fmt: skip
    train.add_argument("--dense-layers", type=_nonnegative_int, default=None,
                       help="first layers kept dense (default 0: every training step and layer sparse)")  # fmt: skip
    train.add_argument("--block-size", type=int, choices=list(BLOCK_SIZES), default=None,
                       help=f"kernel tile ({_radial_default('block_size')})")  # fmt: skip
    train.add_argument("--dense", action="store_true",
                       help="train with dense attention instead "
                            "(the baseline radial LoRAs are compared with)")  # fmt: skip
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each block's activations in the backward pass instead of holding them "
                            "(the same gradients; the memory long videos need, for about one more forward pass a "
                            "step)")  # fmt: skip

    shapes = sub.add_parser(
        "train-shapes",
        help="train the small shapes model from scratch (resumable)",
        description="Train an AutoencoderKL, then a UNet and CLIP text encoder, on procedurally generated scenes of "
        "coloured shapes; resumes from OUT/checkpoint.pt; saves OUT/pipeline (fp16, from_pretrained-loadable).",
    )
    _add_training_run(shapes, ShapesTrainingConfig)
    for flag, field, kind, text in (("--vae-steps", "vae_steps", _nonnegative_int, "autoencoder steps"),
                                    ("--unet-steps", "unet_steps", _nonnegative_int, "UNet + text encoder steps"),
                                    ("--batch-size", "batch_size", _positive_int, "scenes per step")):  # fmt: skip
        default = _default(ShapesTrainingConfig, field)
        shapes.add_argument(flag, type=kind, default=default, help=f"{text} ({default})")

    video = sub.add_parser(
        "train-shapes-video",
        help="train the small video model shapes-wan from scratch (resumable)",
        description="Train the Wan-architecture shapes-wan model (autoencoder, then transformer and UMT5 text "
        "encoder) on rendered clips of moving coloured shapes; resumes from OUT/checkpoint.pt; saves OUT/pipeline "
        "(fp16, from_pretrained-loadable). A GPU trains it in reasonable time; a CPU slowly.",
    )
    _add_training_run(video, ShapesVideoTrainingConfig)
    for flag, field, kind, text in (
        ("--vae-steps", "vae_steps", _nonnegative_int, "autoencoder steps"),
        ("--denoiser-steps", "denoiser_steps", _nonnegative_int, "transformer steps"),
        ("--batch-size", "batch_size", _positive_int, "clips per transformer step"),
        ("--vae-batch-size", "vae_batch_size", _positive_int, "clips per autoencoder step"),
        ("--vae-frames", "vae_frames", _positive_int,
         "frames of an autoencoder clip, 4k+1 and at least 9 (two chunks)"),
        ("--vae-crop", "vae_crop", _positive_int,
         "side of the seeded window the autoencoder trains on; 64: whole frames"),
        ("--decoder-steps", "decoder_steps", _nonnegative_int, "after the autoencoder: steps of its decoder alone on "
         "--decoder-frames clips, the encoder frozen so the transformer's latents stay valid"),
        ("--decoder-frames", "decoder_frames", _positive_int, f"frames of a decoder clip, 4k+1; {NUM_FRAMES} is the "
         "generated length"),
        ("--decoder-lr", "decoder_lr", float, "decoder learning rate"),
        ("--lr", "lr", float, "transformer + text encoder learning rate"),
        ("--warmup-frames", "warmup_frames", _positive_int, "frames of the clips of the first --warmup-steps "
         "transformer steps (4k+1; cheaper)"),
        ("--warmup-steps", "warmup_steps", _nonnegative_int, "transformer steps on short clips"),
        ("--image-every", "image_every", _nonnegative_int, "every Nth transformer step trains on single frames "
         "instead of clips (images and videos trained together; 0: never)"),
        ("--image-batch-size", "image_batch_size", _positive_int, "single frames per --image-every step"),
        ("--timestep-shift", "timestep_shift", float, "train more at high noise: logit-normal noise levels mapped as "
         "the sampler's shift maps its sigmas; 1: unshifted, and shapes-wan samples with shift 3"),
    ):  # fmt: skip
        default = _default(ShapesVideoTrainingConfig, field)
        video.add_argument(flag, type=kind, default=default, help=text if default is None else f"{text} ({default})")
    video.add_argument("--object-weight", type=float, default=_default(ShapesVideoTrainingConfig, "object_weight"),
                       metavar="W",
                       help="the loss where an object is (its latent positions and those beside them) counts "
                       "1 + W times the background's (0: a plain mean)")  # fmt: skip
    video.add_argument("--clip-speeds", type=_positive_int, nargs="+", default=list(SPEEDS), metavar="PX",
                       help="px a frame the transformer's clips move their shapes "
                       f"({' '.join(map(str, SPEEDS))})")  # fmt: skip
    video.add_argument("--no-bounce", action="store_true",
                       help="the transformer's clips only take tracks that fit the frame, so each shape moves its "
                       "captioned way in every frame (33 frames allow speed 1 only)")  # fmt: skip
    video.add_argument("--varying-speed", action="store_true",
                       help="the transformer's clips draw each frame's move from 0 to twice the shape's speed, so "
                       "only nearby frames tell where a shape is (the way still the caption's)")  # fmt: skip
    caption_lengths = _default(ShapesVideoTrainingConfig, "caption_lengths")
    video.add_argument("--caption-lengths", type=int, nargs="+", metavar="TOKENS", default=list(caption_lengths),
                       help="caption tokens each transformer step pads to, drawn per step, so the model reads a "
                            "prompt at any max_sequence_length, WanPipeline's 512 included "
                            f"({' '.join(map(str, caption_lengths))})")  # fmt: skip
    video.add_argument("--attention-heads", type=int, default=DEFAULT_ATTENTION_HEADS, choices=ATTENTION_HEADS,
                       help="heads of the transformer's attention (at --width 96, 4: 24-dim heads, 2: 48-dim "
                       "heads, whose rotary embedding resolves a frame's positions better; --init-from re-splits "
                       "its weights)")  # fmt: skip
    video.add_argument("--width", type=_positive_int, default=INNER_DIM,
                       help=f"the transformer's attention width, a multiple of {WIDTH_STEP} ({INNER_DIM}; "
                       "a new size trains from scratch: with --init-from, add --init-vae-only)")  # fmt: skip
    video.add_argument("--layers", type=_positive_int, default=NUM_LAYERS,
                       help=f"the transformer's blocks ({NUM_LAYERS})")  # fmt: skip
    video.add_argument("--ffn-dim", type=_positive_int, default=FFN_DIM,
                       help=f"the transformer's feed-forward width ({FFN_DIM})")  # fmt: skip
    video.add_argument("--init-vae-only", action="store_true",
                       help="with --init-from: take its trained autoencoder only; the transformer and text encoder "
                       "start fresh (e.g. to train another --attention-heads from scratch)")  # fmt: skip
    video.add_argument("--init-decoder-from", type=Path, default=None,
                       help="with --init-from: take this exported folder's decoder instead (its encoder and "
                            "latent calibration must be --init-from's), e.g. the shipped decoder trained on "
                            "33-frame clips")  # fmt: skip

    sub.add_parser("presets", help="list the offline presets", description="List the offline presets.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad flag (one line already written) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        _quiet_libraries()
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "presets":
            for name, preset in PRESETS.items():
                print(f"{name:20s} {preset.kind:6s} {preset.description}")
            return 0
        if args.command == "generate":
            return _generate(args)
        if args.command == "batch":
            return _batch(args)
        if args.command in ONE_PROCESS_COMMANDS:
            from .parallel import check_single_process

            check_single_process(args.command, "launch it as one process")
        if args.command == "train-lora":
            return _train_lora(args)
        if args.command == "train-shapes":
            from .shapes_training import train_shapes

            config = ShapesTrainingConfig(
                vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch_size=args.batch_size, seed=args.seed,
                checkpoint_every=args.checkpoint_every, device=args.device, max_minutes=args.max_minutes,
                num_workers=args.workers, ema_decay=args.ema_decay,
            )  # fmt: skip
            state = train_shapes(args.out, config, resume=not args.fresh, init_from=args.init_from)
            print(f"{args.out / 'pipeline'} (vae step {state['vae_step']}, unet step {state['unet_step']})")
            return 0
        if args.command == "train-shapes-video":
            from .shapes_video_training import train_shapes_video

            config = ShapesVideoTrainingConfig(
                vae_steps=args.vae_steps, denoiser_steps=args.denoiser_steps, batch_size=args.batch_size,
                vae_batch_size=args.vae_batch_size, vae_frames=args.vae_frames, vae_crop=args.vae_crop, lr=args.lr,
                decoder_steps=args.decoder_steps, decoder_frames=args.decoder_frames, decoder_lr=args.decoder_lr,
                warmup_frames=args.warmup_frames, warmup_steps=args.warmup_steps, image_every=args.image_every,
                image_batch_size=args.image_batch_size,
                attention_heads=args.attention_heads, timestep_shift=args.timestep_shift, width=args.width,
                object_weight=args.object_weight, clip_speeds=tuple(args.clip_speeds), clip_bounce=not args.no_bounce,
                clip_steady=not args.varying_speed, caption_lengths=tuple(args.caption_lengths),
                num_layers=args.layers, ffn_dim=args.ffn_dim,
                seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device,
                max_minutes=args.max_minutes, ema_decay=args.ema_decay, num_workers=args.workers,
            )  # fmt: skip
            if args.init_vae_only and args.init_from is None:
                raise ValueError("--init-vae-only is not allowed without --init-from (the folder whose autoencoder "
                                 "to start from)")  # fmt: skip
            if args.init_decoder_from is not None and args.init_from is None:
                raise ValueError("--init-decoder-from is not allowed without --init-from (the folder whose encoder "
                                 "its decoder must match)")  # fmt: skip
            state = train_shapes_video(args.out, config, resume=not args.fresh, init_from=args.init_from,
                                       init_vae_only=args.init_vae_only,
                                       init_decoder_from=args.init_decoder_from)  # fmt: skip
            print(f"{args.out / 'pipeline'} (vae step {state['vae_step']}, decoder step {state['decoder_step']}, "
                  f"denoiser step {state['denoiser_step']})")  # fmt: skip
            return 0
        if args.command == "demo":
            from .demo import run_demo

            index = run_demo(args.out, steps=args.steps, seed=args.seed, presets=args.presets)
            print(index)
            return 0
    except Exception as exc:
        return _report_error(args, exc)
    return EXIT_USAGE


EXIT_FAILED = 1


def _report_error(args: argparse.Namespace, exc: Exception) -> int:
    """One line on stderr for any error: exit 2 for what the user gave (bad value, missing model, locked or
    unusable folder), 1 for work that was valid but failed (out of memory, a runtime error)."""
    from .jobs import JobLockError
    from .loading import ModelLoadError

    if args.verbose:
        logger.exception("diffattn %s failed", args.command)
    where = f"diffattn {args.command}: error"
    if isinstance(exc, (ValueError, TypeError, ModelLoadError, JobLockError, FileNotFoundError, NotADirectoryError,
                        PermissionError, IsADirectoryError, FileExistsError)):  # fmt: skip
        sys.stderr.write(f"{where}: {_one_line(exc)}\n")
        return EXIT_USAGE
    if _is_out_of_memory(exc):
        sys.stderr.write(f"{where}: out of memory{_size_asked(args)}; try a smaller --height/--width, fewer "
                         "--num-frames or fewer steps, or --dtype float16 on a GPU\n")  # fmt: skip
        return EXIT_FAILED
    sys.stderr.write(f"{where}: {type(exc).__name__}: {_one_line(exc)} (run with -v for the traceback)\n")
    return EXIT_FAILED


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).splitlines()).strip() or type(exc).__name__  # one line; the rest kept as it is
    return text if len(text) <= 500 else text[:497] + "..."


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _size_asked(args: argparse.Namespace) -> str:
    parts = [f"{k}={getattr(args, k)}" for k in ("height", "width", "num_frames", "steps") if getattr(args, k, None)]
    return f" (asked for {', '.join(parts)})" if parts else ""


def _check_out_folder(out: Path) -> None:
    """The output folder exists or can be made, before any work (raises ValueError naming it)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is not allowed: it is a file, expected a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {str(out)!r} is not allowed: cannot create the folder ({exc.strerror})") from None


def _train_lora(args: argparse.Namespace) -> int:
    from .training import lora_radial_defaults, train_radial_lora

    given = _radial_flags_given(args)
    if args.dense and given:
        raise ValueError(f"radial options {sorted(given)} are not allowed with --dense (it trains dense attention)")
    radial = None if args.dense else dataclasses.replace(lora_radial_defaults(args.model), **given)
    summary = train_radial_lora(
        args.model,
        args.data,
        args.out,
        steps=args.steps,
        rank=args.rank,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        radial=radial,
        dense=args.dense,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    losses = summary["losses"]
    print(f"{args.out} ({len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from .jobs import JobDefaults, missing_units, read_job, run_job

    limits = _limits(args)
    defaults = JobDefaults(model=args.model, steps=args.steps, seeds=tuple(args.seeds), maps=args.maps)
    units = read_job(args.job, defaults, limits)
    _check_out_folder(args.out)
    report = run_job(
        units, args.out, device=args.device, torch_dtype=args.dtype, batch_size=args.batch_size, limits=limits,
        context_parallel=args.context_parallel,
    )  # fmt: skip
    if report.process_index != 0:
        return 1 if report.failed else 0
    missing = missing_units(units, args.out)
    print(f"{args.out}: {len(units) - len(missing)} of {len(units)} outputs done ({len(report.generated)} now)")
    if missing:
        sys.stderr.write(f"diffattn batch: {len(missing)} not done (see {args.out}/failures-rank*.jsonl): {missing}\n")
        return 1
    return 0


def _quiet_libraries() -> None:
    """diffusers/transformers warn on every offline hub probe; our own error says what matters in one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    # Loading bars go too; the denoising progress bar (the pipeline's own tqdm) stays.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


_RADIAL_FLAGS = {
    "decay_factor": "decay_factor",
    "dense_timesteps": "dense_timesteps",
    "dense_last_timesteps": "dense_last_timesteps",
    "dense_layers": "dense_layers",
    "block_size": "block_size",
    "sink_frames": "sink_frames",
    "attention_backend": "backend",
    "dense_neighbor_frames": "dense_neighbor_frames",
}


def _radial_flags_given(args: argparse.Namespace) -> dict:
    """RadialAttentionConfig fields from the radial flags a command has and was given (None: not given)."""
    given = {field: getattr(args, flag, None) for flag, field in _RADIAL_FLAGS.items()}
    return {field: value for field, value in given.items() if value is not None}


def radial_config_from_args(args: argparse.Namespace, model: str):
    """A RadialAttentionConfig from the --radial flags over `model`'s radial defaults (None without --radial; flags
    alone are an error)."""
    from .generation import radial_defaults

    given = _radial_flags_given(args)
    if not args.radial:
        if given:
            raise ValueError(f"radial options {sorted(given)} need --radial")
        return None
    return dataclasses.replace(radial_defaults(model), **given)


def model_from_args(args: argparse.Namespace) -> str:
    """--model, else the default video model for a video request (--radial or --num-frames), else the image one."""
    if args.model is not None:
        return args.model
    return DEFAULT_VIDEO_PRESET if args.radial or args.num_frames is not None else DEFAULT_PRESET


def agent_config_from_args(args: argparse.Namespace):
    """An AgentAttentionConfig from --agent / --tome (None with neither)."""

    if args.agent and args.tome:
        raise ValueError("--agent and --tome are alternatives: pass one")
    if not (args.agent or args.tome):
        if args.merge_ratio is not None:
            raise ValueError("--merge-ratio needs --agent or --tome")
        return None
    if args.tome:
        return AgentAttentionConfig.tome() if args.merge_ratio is None else AgentAttentionConfig.tome(args.merge_ratio)
    return AgentAttentionConfig() if args.merge_ratio is None else AgentAttentionConfig(ratio=args.merge_ratio)


def structured_config_from_args(args: argparse.Namespace):
    """A StructuredGuidanceConfig from --structured (None without it; its options alone are an error)."""
    from .methods.structured_guidance import StructuredGuidanceConfig

    if not args.structured:
        if args.conjunction or args.phrase:
            raise ValueError("--conjunction and --phrase need --structured")
        return None
    return StructuredGuidanceConfig(mode="conjunction" if args.conjunction else "default", phrases=args.phrase)


def ir_config_from_args(args: argparse.Namespace):
    """An IRDiffusionConfig from --subject / --mask-dropout (None without --subject; its options without
    --subject are an error)."""

    if not args.subject:
        if args.ir_masks is not None or args.mask_dropout is not None:
            raise ValueError("--ir-masks and --mask-dropout need --subject")
        return None
    return IRDiffusionConfig() if args.mask_dropout is None else IRDiffusionConfig(mask_dropout=args.mask_dropout)


_NOT_WITH_REQUEST = ("prompt", "negative_prompt", "steps", "guidance_scale", "guidance_interval", "height", "width",
                     "num_frames", "agent", "tome", "merge_ratio", "structured", "conjunction", "phrase", "astar",
                     "subject", "ir_masks", "mask_dropout", "radial", "decay_factor", "dense_timesteps",
                     "dense_last_timesteps", "dense_layers", "block_size", "sink_frames", "attention_backend",
                     "dense_neighbor_frames", "no_maps")  # fmt: skip


def _recorded_request(args: argparse.Namespace):
    """The request in `--request` (a request's JSON, or a manifest record with a "request")."""
    import json

    from .request import GenerationRequest

    defaults = build_parser().parse_args(["generate"])
    given = [f"--{n.replace('_', '-')}" for n in _NOT_WITH_REQUEST if getattr(args, n) != getattr(defaults, n)]
    if given or args.model != defaults.model or args.seed != defaults.seed:
        given += ["--model"] if args.model != defaults.model else []
        given += ["--seed"] if args.seed != defaults.seed else []
        raise ValueError(f"--request holds the whole request; it does not combine with {', '.join(given)}")
    try:
        data = json.loads(args.request.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--request {str(args.request)!r} is not allowed: no such file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"--request {str(args.request)!r} is not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("request"), dict):
        data = data["request"]  # a batch manifest record
    return GenerationRequest.from_dict(data)


def request_from_args(args: argparse.Namespace):
    """The GenerationRequest the `generate` flags describe (ValueError naming the flag's field when invalid)."""
    from .request import GenerationRequest

    if args.request is not None:
        return _recorded_request(args)
    if args.prompt is None:
        raise ValueError("--prompt is required (or --request with a recorded request)")
    model = model_from_args(args)
    return GenerationRequest(
        model=model,
        prompt=args.prompt,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        attention_maps=not args.no_maps,
        radial=radial_config_from_args(args, model),
        agent=agent_config_from_args(args),
        structured=structured_config_from_args(args),
        astar=args.astar,
        subjects=None if args.subject is None else tuple(args.subject),
        ir=ir_config_from_args(args),
        masks=args.ir_masks or "auto",
    )


def _context_parallel_pipeline(args: argparse.Namespace, request):
    """The pipeline of this process of a context-parallel launch, sharded with diffusers' engine; and the rank."""
    from .loading import load_pipeline
    from .parallel import enable_context_parallel, init_processes

    if args.ring and request.radial is not None:
        raise ValueError(
            "--ring with --radial is not supported: a ring passes every key block around, so the mask saves nothing; "
            "use Ulysses (leave out --ring)"
        )
    rank, _, device = init_processes(args.context_parallel)
    pipe = load_pipeline(request.model, torch_dtype=args.dtype, device=args.device or device)
    enable_context_parallel(pipe, args.context_parallel, ring=args.ring)
    if rank != 0:
        pipe.set_progress_bar_config(disable=True)
    return pipe, rank


def _generate(args: argparse.Namespace) -> int:
    from .generation import check_request_limits, generate
    from .outputs import save_result
    from .parallel import check_single_process

    limits = _limits(args)
    request = request_from_args(args)
    check_request_limits(request, limits)
    if args.context_parallel is None:
        if args.ring:
            raise ValueError("--ring needs --context-parallel N")
        check_single_process("generate", "share one video across processes with --context-parallel N, or spread "
                             "many prompts with `diffattn batch`")  # fmt: skip
    preset = PRESETS.get(request.model)
    if args.fps is not None and preset is not None and preset.kind != "video":
        raise ValueError(f"--fps {args.fps} is for video models; {request.model!r} is an image model")
    _check_out_folder(args.out)
    pipe, rank = None, 0
    if args.context_parallel is not None:
        pipe, rank = _context_parallel_pipeline(args, request)
    result = generate(request, torch_dtype=args.dtype, device=args.device, limits=limits, pipe=pipe)
    if rank != 0:
        return 0  # every process made the same video; process 0 writes it
    methods = {
        "radial": request.radial is not None,
        "agent": request.agent is not None and request.agent.agent_ratio is not None,
        "tome": request.agent is not None and request.agent.agent_ratio is None,
        "structured": request.structured is not None,
        "astar": request.astar is not None,
        "ir": request.subjects is not None,
    }
    suffix = "".join(f"-{name}" for name, on in methods.items() if on)
    stem = f"{Path(request.model).name}-seed{request.seed}{suffix}"
    if args.fps is not None and not result.frames:  # a folder or hub id: its kind is known once loaded
        logger.warning("--fps %d not used: %r made images, not a video", args.fps, request.model)
    for path in save_result(result, args.out, stem, fps=DEFAULT_FPS if args.fps is None else args.fps):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
