import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import diffattn
from diffattn.presets import PRESETS, get_preset, missing_components, preset_path

from helpers import load, run


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.build is not None])
def test_preset_saves_and_reloads_through_from_pretrained(name, tmp_path):
    folder = preset_path(name, root=tmp_path)
    assert (folder / "model_index.json").is_file()
    assert list(folder.rglob("*.safetensors")), "weights must be saved as safetensors"
    assert not list(folder.rglob("*.bin")), "no pickle weights"
    built = get_preset(name).build()
    reloaded = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    assert type(reloaded) is type(built)
    denoiser = "unet" if hasattr(built, "unet") else "transformer"
    fresh_state = getattr(built, denoiser).state_dict()
    loaded_state = getattr(reloaded, denoiser).state_dict()
    assert fresh_state.keys() == loaded_state.keys()
    for key in fresh_state:
        torch.testing.assert_close(loaded_state[key], fresh_state[key], rtol=0, atol=0, msg=key)
    # the seeded build is reproducible
    again = get_preset(name).build()
    for key, value in getattr(again, denoiser).state_dict().items():
        assert torch.equal(value, fresh_state[key]), key


def _files(folder):
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())


def test_a_preset_built_by_a_later_process_of_a_launch_is_whole(tmp_path):
    """Once torch.distributed is initialised, transformers writes a model's files on rank 0 only: a preset that rank 1
    of a launch built had an empty text_encoder folder, and every later load of it failed."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        folder = preset_path("tiny-sd", root=tmp_path / "rank1")
    finally:
        dist.destroy_process_group()
    reference = preset_path("tiny-sd", root=tmp_path / "alone")
    assert missing_components(folder) == []
    assert _files(folder) == _files(reference)
    built, alone = (load_file(f / "text_encoder" / "model.safetensors") for f in (folder, reference))
    assert built.keys() == alone.keys() and all(torch.equal(built[k], alone[k]) for k in alone)
    assert type(diffattn.load_pipeline(str(folder)).text_encoder).__name__ == "CLIPTextModel"


@pytest.mark.parametrize("component, removed", [("text_encoder", "*"), ("unet", "*.safetensors")])
def test_a_cached_preset_missing_a_component_is_rebuilt(tmp_path, caplog, component, removed):
    folder = preset_path("tiny-sd", root=tmp_path)
    weights = _files(folder)
    for file in (folder / component).glob(removed):  # what an interrupted or rank-skipped save of old left
        file.unlink()
    assert missing_components(folder) == [component]
    with caplog.at_level(logging.WARNING, logger="diffattn.presets"):
        again = preset_path("tiny-sd", root=tmp_path)
    assert again == folder and f"lacks {component}: rebuilding it" in caplog.text
    assert _files(again) == weights
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]  # no temporary left behind
    diffattn.load_pipeline(str(again))


def test_processes_asking_for_one_preset_at_once_build_it_once(tmp_path):
    """Every process of a launch asks for the model at the same moment: one builds (under a lock), the others wait
    and load the same folder."""
    child = (
        "import dataclasses, sys, time\n"
        "from diffattn import presets\n"
        "preset = presets.PRESETS['tiny-sd']\n"
        "def build():\n"
        "    with open(sys.argv[1], 'a') as log:\n"
        "        log.write('built\\n')\n"
        "    time.sleep(2)  # the others ask meanwhile\n"
        "    return preset.build()\n"
        "presets.PRESETS['tiny-sd'] = dataclasses.replace(preset, build=build)\n"
        "print(presets.preset_path('tiny-sd', root=sys.argv[2]))\n"
    )
    builds, root = tmp_path / "builds.txt", tmp_path / "root"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(builds), str(root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-1500:] for _, err in outs]
    folder = root / "presets" / f"tiny-sd-v{PRESETS['tiny-sd'].version}"
    assert {out.strip() for out, _ in outs} == {str(folder)}
    assert builds.read_text() == "built\n"
    assert missing_components(folder) == []


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_generates_deterministically_and_fast(name):
    pipe = load(name)
    start = time.perf_counter()
    first = run(pipe, name, steps=4, seed=0)
    elapsed = time.perf_counter() - start
    second = run(pipe, name, steps=4, seed=0)
    other = run(pipe, name, steps=4, seed=1)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.isfinite(first).all()
    defaults = PRESETS[name].call_defaults
    if PRESETS[name].kind == "image":
        assert first.shape == (1, 3, defaults["height"], defaults["width"])
    else:
        assert first.shape == (1, defaults["num_frames"], 3, defaults["height"], defaults["width"])
    assert elapsed < 20.0, f"{name} took {elapsed:.1f}s at 4 steps"


def test_tiny_sd_keeps_attention_at_three_resolutions_with_16x16():
    pipe = load("tiny-sd")
    seen = {}

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kind = "cross" if kwargs.get("encoder_hidden_states") is not None else "self"
        seen.setdefault(kind, set()).add(hidden.shape[1])

    handles = [
        m.register_forward_pre_hook(record, with_kwargs=True)
        for n, m in pipe.unet.named_modules()
        if n.endswith(("attn1", "attn2"))
    ]
    run(pipe, "tiny-sd", steps=1)
    for h in handles:
        h.remove()
    assert seen["self"] == {256, 64, 16}
    assert seen["cross"] == {256, 64, 16}


def test_video_presets_keep_patching_rotary_and_text_layout():
    wan = load("tiny-wan")
    assert tuple(wan.transformer.config.patch_size) == (1, 2, 2)
    assert hasattr(wan.transformer, "rope")
    assert any(n.endswith("attn2") for n, _ in wan.transformer.named_modules())  # text via cross-attention
    hunyuan = load("tiny-hunyuan-video")
    cfg = hunyuan.transformer.config
    assert (cfg.patch_size, cfg.patch_size_t) == (2, 1)
    assert sum(cfg.rope_axes_dim) == cfg.attention_head_dim
    assert hasattr(hunyuan.transformer, "rope")
    assert hunyuan.vae.config.temporal_compression_ratio == 4 and hunyuan.vae.config.spatial_compression_ratio == 8


def test_tokenizers_know_prompt_words_and_spell_unknown_ones():
    pipe = load("tiny-sd")
    tokens = pipe.tokenizer.tokenize("a red cat xyzzy")
    assert tokens[:3] == ["a</w>", "red</w>", "cat</w>"]
    assert "".join(tokens[3:]).replace("</w>", "") == "xyzzy"


def test_unknown_preset_error_lists_presets():
    with pytest.raises(ValueError, match="unknown preset 'tiny-nope'.*tiny-sd"):
        preset_path("tiny-nope")


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(diffattn.ModelLoadError, match="cannot load 'someone/not-a-model'"):
        diffattn.load_pipeline("someone/not-a-model")
    with pytest.raises(diffattn.ModelLoadError, match="no model_index.json"):
        diffattn.load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="torch_dtype='fp8'"):
        diffattn.load_pipeline("tiny-sd", torch_dtype="fp8")
    with pytest.raises(ValueError, match="device='gpu0' is not allowed: expected a torch device"):
        diffattn.load_pipeline("tiny-sd", device="gpu0")
    with pytest.raises(ValueError, match=r"device='cuda:99' is not available: torch sees \d+ CUDA GPU"):
        diffattn.load_pipeline("tiny-sd", device="cuda:99")


def test_faces_run_on_a_gpu_when_there_is_one_and_on_the_cpu_otherwise(monkeypatch):
    """`load_pipeline` leaves a pipeline on the CPU as `from_pretrained` does; the generation layer every face
    (CLI, UI, demo, jobs) loads through names `default_device()`: DIFFATTN_DEVICE when set, else cuda when torch
    sees a CUDA GPU."""
    from diffattn import generation
    from diffattn.loading import DEVICE_ENV, default_device

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    loaded = []
    monkeypatch.setattr(generation, "load_pipeline", lambda model, torch_dtype, device: loaded.append(device) or model)
    cache = generation.PipelineCache(size=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu" and cache.get("tiny-sd") == "tiny-sd" and loaded == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    cache.get("tiny-sd")
    assert loaded == ["cpu", "cuda"]  # another device, another entry
    cache.get("tiny-sd", device="cpu")  # named, and already loaded there
    assert loaded == ["cpu", "cuda"] and list(cache.entries) == [("tiny-sd", None, "cuda"), ("tiny-sd", None, "cpu")]
    monkeypatch.setenv(DEVICE_ENV, "cpu")  # a GPU machine told to stay on the CPU
    assert default_device() == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(ValueError, match="DIFFATTN_DEVICE='gpu0' is not allowed"):
        default_device()


def test_a_half_precision_folder_loads_in_one_dtype_on_the_cpu():
    """A local folder with fp16 weights (the shipped shapes-wan's), no dtype asked: diffusers loads its models in
    float32 but transformers kept the text encoder in float16 (diffusers then warns it cannot run on the CPU).
    Every component is float32, holding the saved values exactly."""
    from safetensors.torch import load_file

    folder = preset_path("shapes-wan")
    pipe = diffattn.load_pipeline(str(folder))
    dtypes = {name: {p.dtype for p in module.parameters()} for name, module in pipe.components.items()
              if isinstance(module, torch.nn.Module)}  # fmt: skip
    assert dtypes == {"vae": {torch.float32}, "text_encoder": {torch.float32}, "transformer": {torch.float32}}
    saved = load_file(next((folder / "text_encoder").glob("*.safetensors")))
    assert {t.dtype for t in saved.values()} == {torch.float16}
    loaded = pipe.text_encoder.state_dict()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value.float()), key


def test_load_pipeline_from_local_folder_with_dtype(tmp_path):
    folder = preset_path("tiny-sd")
    pipe = diffattn.load_pipeline(str(folder), torch_dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16


def _shipped_pipeline(name: str, max_mb: int, denoiser: str, weight: str):
    """A trained preset loaded from inside the package: its folder's size, its fp16 weights, and the loaded
    pipeline (fp32 on the CPU) holding exactly those weights. Returns the pipeline and its folder."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = preset_path(name)
    assert folder.parent == Path(diffattn.presets.__file__).parent  # in the package, nothing built or cached
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= max_mb * 2**20
    shipped = load_file(folder / denoiser / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float16 for t in shipped.values())
    pipe = diffattn.load_pipeline(name)
    model = getattr(pipe, denoiser)
    assert model.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    torch.testing.assert_close(model.state_dict()[weight], shipped[weight].float(), rtol=0, atol=0)
    return pipe, folder


def test_shapes_sd_is_shipped_small_and_loads_in_fp32_on_cpu():
    _shipped_pipeline("shapes-sd", 10, "unet", "conv_in.weight")


MIN_HITS = 20  # of 24; the shipped weights (11,194 UNet steps) score 23 here, the 7,250-step ones (Euler) 18


def test_shapes_sd_draws_the_prompted_shape_in_the_prompted_colour():
    """The judge (itself tested against scene ground truth) finds the prompted object in most of the 24
    single-object prompts, at the preset's settings (its DPM-Solver++ scheduler, 20 steps, guidance 5). Noise scores
    0; the H100 leg's uncalibrated weights scored 6% (fill-ratio judge)."""
    from diffattn.judge import detect_objects
    from diffattn.scenes import COLORS, SHAPES

    pipe = load("shapes-sd")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    prompts = [(color, shape) for color in COLORS for shape in SHAPES]
    images = pipe([f"a {c} {s}" for c, s in prompts], num_inference_steps=20, guidance_scale=5.0, height=64, width=64,
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    hits = [any(d.color == c and d.shape == s for d in detect_objects(im)) for (c, s), im in zip(prompts, images)]
    assert sum(hits) >= MIN_HITS, f"{sum(hits)} of 24"


def test_shapes_wan_is_shipped_small_and_loads_like_a_real_wan_model():
    pipe, folder = _shipped_pipeline("shapes-wan", 15, "transformer", "patch_embedding.weight")
    assert type(pipe).__name__ == "WanPipeline" and type(pipe.vae).__name__ == "AutoencoderKLWan"
    assert tuple(pipe.transformer.config.patch_size) == (1, 1, 1) and pipe.vae_scale_factor_spatial == 4
    state = json.loads((folder / "training_state.json").read_text())
    assert state["calibrated"] and state["denoiser_step"] > 0


# On these 4 prompts (a square and three triangles): mean share of frames with the captioned object (colour and
# shape) 0.21 with the shipped weights (16,589 transformer steps on 2 CPU cores, still short of the targets;
# their moving triangles are mostly drawn round), 0.39 with the weights shipped before (9,235 steps), 0.23 at 2,955
# steps, 0.09 for the architecture untrained; the colour's track goes the captioned way in 4 of 4 with both shipped.
SHAPES_WAN_MIN_PRESENCE = 0.15
SHAPES_WAN_MIN_COLOUR_WAY = 3


def test_shapes_wan_draws_the_captioned_colour_moving_the_captioned_way():
    """The video judge (itself tested against clip ground truth) reads the captioned colour moving the captioned way
    (the largest region of that colour, tracked over the frames: what a detector of colour and motion sees) in at
    least 3 of 4 held-out single-object prompts at the preset's settings, and finds the object with its colour and
    shape in more frames than the untrained architecture draws it. Uniform noise frames give no colour track and
    presence 0-0.03."""
    import sys
    from pathlib import Path

    from PIL import Image

    from diffattn.judge import judge_clip

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import radial_quality as rq

    pipe = load("shapes-wan")
    prompts = rq.held_out_prompts(4, 33, single_only=True)
    videos = rq.sample(pipe, prompts, frames=33, steps=PRESETS["shapes-wan"].steps, batch=4,
                       defaults=PRESETS["shapes-wan"].call_defaults)  # fmt: skip
    tracks = [judge_clip([Image.fromarray(f) for f in v], p.caption)[0] for v, p in zip(videos, prompts)]
    colour_way = sum(t.color_direction == t.direction for t in tracks)
    assert colour_way >= SHAPES_WAN_MIN_COLOUR_WAY, [(t.direction, t.color_direction) for t in tracks]
    presence = [t.present for t in tracks]
    assert sum(presence) / len(presence) >= SHAPES_WAN_MIN_PRESENCE, presence
