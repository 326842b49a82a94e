"""The radial quality benchmark's parts against hand computations: PSNR/SSIM, the equal-density baselines, the
attention-energy tables."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffattn.loading import load_pipeline
from diffattn.methods.radial_mask import radial_block_mask
from diffattn.video_metrics import PSNR_CAP, psnr, ssim


sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import radial_quality as rq  # noqa: E402


def _video(seed: int, frames: int = 2, size: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(frames)]


def test_psnr_against_hand_values():
    a = [np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 50, np.uint8)]
    b = [np.full((16, 16, 3), 105, np.uint8), np.full((16, 16, 3), 50, np.uint8)]
    # frame 1: MSE 25 -> 10 log10(65025 / 25); frame 2 identical -> the cap
    assert psnr(a, b) == pytest.approx((10 * math.log10(255**2 / 25) + PSNR_CAP) / 2)
    with pytest.raises(ValueError, match="cannot be compared"):
        psnr(a, b[:1])


def test_ssim_of_constant_frames_is_the_luminance_term():
    # constant frames: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = [np.full((16, 16, 3), 100, np.uint8)], [np.full((16, 16, 3), 140, np.uint8)]
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100**2 + 140**2 + c1), rel=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_against_a_windowed_loop():
    a, b = _video(0, frames=1, size=13), _video(1, frames=1, size=13)
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for c in range(3):
        for i in range(3):
            for j in range(3):
                pa = a[0][i : i + 11, j : j + 11, c].astype(float)
                pb = b[0][i : i + 11, j : j + 11, c].astype(float)
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
                cov = (w * pa * pb).sum() - ma * mb
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert ssim(a, b) == pytest.approx(float(np.mean(values)), rel=1e-9)


GEOMETRY = (9, 256)  # shapes-wan: 9 latent frames of 16x16 tokens


@pytest.mark.parametrize("block", [16, 32])
def test_baselines_have_exactly_the_radial_block_count(block):
    radial = radial_block_mask(*GEOMETRY, block_size=block, decay_factor=0.25)
    masks = rq.baseline_masks(radial, *GEOMETRY, block, sink_frames=1)
    for name, mask in masks.items():
        assert mask.shape == radial.shape, name
        assert int(mask.sum()) == int(radial.sum()), name
        assert not torch.equal(mask, radial), name


def test_baseline_structures():
    block, (frames, per_frame) = 16, GEOMETRY
    per = per_frame // block
    radial = radial_block_mask(frames, per_frame, block_size=block, decay_factor=0.25)
    count = int(radial.sum())
    index = torch.arange(frames * per)
    qf, kf = (index // per)[:, None], (index // per)[None, :]
    offset = ((index % per)[:, None] - (index % per)[None, :]).abs()
    distance = (qf - kf).abs()

    random = rq.random_block_mask(frames, per_frame, block, count, sink_frames=1)
    assert random.diagonal().all() and random[:, :per].all()  # diagonal and the sink frame's key blocks

    local = rq.local_window_mask(frames, per_frame, block, count)
    widest = int(offset[local].max())
    assert local[offset < widest].all()  # every frame pair has the same full band below the top-up offset
    assert not local[offset > widest].any()
    inside = local[offset == widest].float().mean()
    assert 0 < inside <= 1

    temporal = rq.temporal_band_mask(frames, per_frame, block, count)
    reach = int(distance[temporal].max())
    assert temporal[distance < reach].all() and not temporal[distance > reach].any()


def test_energy_recorder_against_explicit_sums():
    frames, height, width, heads, dim = 3, 2, 3, 2, 4
    n = frames * height * width
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, heads, dim, generator=generator)
    k = torch.randn(1, n, heads, dim, generator=generator)
    recorder = rq.EnergyRecorder(frames, height, width, stride=1)
    recorder.record(q, k)
    tables = recorder.tables()
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / dim**0.5, -1).mean((0, 1)).double()
    temporal = [0.0] * frames
    same_frame = {}
    for i in range(n):
        for j in range(n):
            fi, fj = i // (height * width), j // (height * width)
            temporal[abs(fi - fj)] += float(probs[i, j]) / n
            if fi == fj:
                yi, xi, yj, xj = (i // width) % height, i % width, (j // width) % height, j % width
                r = round(math.hypot(yi - yj, xi - xj))
                same_frame[r] = same_frame.get(r, 0.0) + float(probs[i, j]) / n
    assert tables["temporal_mass"] == pytest.approx(temporal, abs=1e-9)
    assert sum(tables["temporal_mass"]) == pytest.approx(1.0)
    assert tables["spatial_mass_same_frame"] == pytest.approx(
        [same_frame.get(r, 0.0) for r in range(len(tables["spatial_distance"]))], abs=1e-9
    )
    # keys per query at frame distance d: 2 (frames - d) / frames frames of 6 (1 at d = 0)
    keys_per_distance = [height * width * (frames if d == 0 else 2 * (frames - d)) / frames for d in range(frames)]
    expected = [t / c for t, c in zip(temporal, keys_per_distance)]
    assert tables["temporal_mass_per_key"] == pytest.approx(expected, abs=1e-9)


def test_interval_is_the_normal_approximation():
    values = [1.0, 2.0, 3.0, 4.0]
    out = rq.interval(values)
    half = 1.96 * np.std(values, ddof=1) / 2
    assert out["mean"] == 2.5 and out["low"] == pytest.approx(2.5 - half) and out["high"] == pytest.approx(2.5 + half)


class _SeededVideoPipe:
    """Stands in for a Wan pipeline: each video is a function of its generator's seed; records what it sampled."""

    class Transformer(torch.nn.Linear):
        device = torch.device("cpu")  # diffusers models have a device; a test may name another

    def __init__(self, weight: float = 1.0):
        self.transformer = self.Transformer(2, 2)
        torch.nn.init.constant_(self.transformer.weight, weight)
        torch.nn.init.zeros_(self.transformer.bias)
        self.sampled: list[str] = []

    def __call__(self, prompt, generator, num_frames, output_type, **_):
        self.sampled += prompt
        frames = [torch.rand(num_frames, 4, 4, 3, generator=g).numpy() for g in generator]

        class Out:
            pass

        out = Out()
        out.frames = frames
        return out


def _sample(pipe, prompts, stored=None, batch=2):
    return rq.sample(pipe, prompts, frames=3, steps=1, batch=batch, defaults={}, stored=stored)


def test_sample_resumes_from_the_store(tmp_path):
    prompts = [rq.Prompt(f"a red circle moving {d}", seed) for seed, d in enumerate(["left", "right", "up", "down"])]
    fresh = _sample(_SeededVideoPipe(), prompts)

    pipe = _SeededVideoPipe()
    store = rq.VideoStore(tmp_path, pipe, {"num_frames": 3})
    folder = store.variant("dense")
    first = _sample(pipe, prompts[:3], stored=folder)
    assert pipe.sampled == [p.caption for p in prompts[:3]]
    pipe.sampled.clear()
    resumed = _sample(pipe, prompts, stored=folder)  # a run that stopped after 3 videos, started again for 4
    assert pipe.sampled == [prompts[3].caption]  # only the missing video is sampled
    for a, b, c in zip(first + [fresh[3]], resumed, fresh):
        assert np.array_equal(a, b) and np.array_equal(b, c) and b.dtype == np.uint8
    assert not list(folder.glob("*.partial.npy"))
    again, timing = rq.timed_sample(pipe, prompts, stored=folder, frames=3, steps=1, batch=2, defaults={})
    assert timing["videos_sampled"] == 0 and all(np.array_equal(a, b) for a, b in zip(again, fresh))
    _, timing = rq.timed_sample(pipe, prompts[:2], stored=None, frames=3, steps=1, batch=2, defaults={})
    assert timing["videos_sampled"] == 2 and timing["seconds"] >= 0
    # the same seed with another caption is another video
    pipe.sampled.clear()
    _sample(pipe, [rq.Prompt("a blue star moving up", 0)], stored=folder)
    assert pipe.sampled == ["a blue star moving up"]


def test_store_keys_the_setting(tmp_path):
    pipe = _SeededVideoPipe()
    store = rq.VideoStore(tmp_path, pipe, {"num_frames": 3})
    config = rq.RadialAttentionConfig(decay_factor=0.25)
    mask = torch.eye(4, dtype=torch.bool)
    folder = store.variant("random", config, mask)
    assert folder == rq.VideoStore(tmp_path, _SeededVideoPipe(), {"num_frames": 3}).variant("random", config, mask)
    others = [
        rq.VideoStore(tmp_path, _SeededVideoPipe(weight=2.0), {"num_frames": 3}).variant("random", config, mask),
        rq.VideoStore(tmp_path, pipe, {"num_frames": 5}).variant("random", config, mask),
        store.variant("random", rq.RadialAttentionConfig(decay_factor=1.0), mask),
        store.variant("random", config, ~mask),
        store.variant("local", config, mask),
    ]
    on_gpu = _SeededVideoPipe()
    on_gpu.transformer.device = torch.device("cuda")  # the same weights on another device
    others.append(rq.VideoStore(tmp_path, on_gpu, {"num_frames": 3}).variant("random", config, mask))
    redecoded = _SeededVideoPipe()  # the same transformer, another decoder
    redecoded.vae = torch.nn.Linear(2, 2)
    others.append(rq.VideoStore(tmp_path, redecoded, {"num_frames": 3}).variant("random", config, mask))
    assert len({folder, *others}) == 8


class _AdapterPipe:
    """Stands in for the pipeline a LoRA trains on: records adapter removals."""

    def __init__(self):
        self.removed = 0
        outer = self

        class Transformer:
            device = torch.device("cpu")

            def active_adapters(self):
                return ["default"]

            def delete_adapters(self, names):
                outer.removed += 1

        self.transformer = Transformer()


def test_a_finished_lora_is_reused_and_an_unfinished_one_retrained(tmp_path, monkeypatch):
    import diffattn.training

    calls = []

    def fake_train(model, clips, out, *, steps, overwrite, **kwargs):
        calls.append(Path(out))
        assert overwrite and clips.is_dir()
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "pytorch_lora_weights.safetensors").write_bytes(b"weights %d" % len(calls))
        return {"losses": [0.5, 0.25, 0.125], "step_seconds": [0.3, 0.1, 0.2]}

    monkeypatch.setattr(diffattn.training, "train_radial_lora", fake_train)
    monkeypatch.setattr(rq, "write_clips", lambda folder, *a, **k: folder.mkdir(parents=True))
    args = SimpleNamespace(model="shapes-wan", lora_clips=2, lora_steps=3, lora_rank=4, lora_lr=1e-4)
    defaults = {"height": 64, "width": 64}
    folder = tmp_path / "lora-radial"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"a killed run's")  # no training.json: unfinished
    pipe = _AdapterPipe()
    first = rq.train_lora_once(pipe, folder, tmp_path / "clips", None, args, defaults, frames=129)
    assert calls == [tmp_path / "lora-radial.partial"] and pipe.removed == 1
    assert first["steps"] == 3 and first["rank"] == 4 and first["final_loss"] == 0.125 and first["seconds"] >= 0
    assert first["median_step_seconds"] == 0.2
    assert first["device"].startswith("cpu") and first["trained"]
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == b"weights 1"
    assert not (tmp_path / "lora-radial.partial").exists()
    again = rq.train_lora_once(pipe, folder, tmp_path / "clips", None, args, defaults, frames=129)
    assert again == first and len(calls) == 1  # the recorded time of the finished fine-tune, not a new one


def test_extension_comparisons_against_hand_computations():
    names = ("dense", "radial", "dense+lora", "radial+lora")
    videos = {name: [_video(10 * i + j) for j in range(3)] for i, name in enumerate(names)}
    videos["radial"] = [videos["dense"][0], *videos["radial"][1:]]  # one video identical to dense: PSNR capped
    verdicts = {  # (kept, direction, present) per video
        "dense": [(0, 1, 0.5), (1, 1, 1.0), (0, 0, 0.25)],
        "radial": [(0, 0, 0.5), (0, 1, 0.75), (0, 0, 0.0)],
        "dense+lora": [(1, 1, 1.0), (1, 1, 1.0), (0, 1, 0.5)],
        "radial+lora": [(1, 0, 0.75), (0, 1, 0.5), (0, 1, 0.5)],
    }
    judged = {n: [{"kept": bool(k), "direction": bool(d), "present": p} for k, d, p in v] for n, v in verdicts.items()}
    out = rq.extension_comparisons(videos, judged)
    psnrs = [PSNR_CAP, psnr(videos["radial"][1], videos["dense"][1]), psnr(videos["radial"][2], videos["dense"][2])]
    assert out["radial_vs_dense"]["radial vs dense"]["psnr"]["mean"] == pytest.approx(sum(psnrs) / 3)
    assert out["radial_vs_dense"]["radial vs dense"]["ssim"]["n"] == 3
    pair = out["paired_judge_difference"]["radial+lora - dense+lora"]
    # kept: 0, -1, 0; direction: -1, 0, 0; present: -0.25, -0.5, 0
    assert pair["kept"]["mean"] == pytest.approx(-1 / 3)
    assert pair["direction"]["mean"] == pytest.approx(-1 / 3)
    assert pair["present"]["mean"] == pytest.approx(-0.25)
    assert pair["present"]["low"] == pytest.approx(-0.25 - 1.96 * np.std([-0.25, -0.5, 0], ddof=1) / math.sqrt(3))
    assert out["paired_judge_difference"]["dense+lora - dense"]["present"]["mean"] == pytest.approx(0.25)


def test_judge_workers_judge_as_the_judge_does(monkeypatch):
    """Videos judged in forked processes get the verdicts the judge gives each rendered clip in this process."""
    from diffattn.judge import judge_clip
    from diffattn.scenes import render_clip

    clips = [render_clip(seed, 9) for seed in (3, 11, 20)]
    videos = [np.stack([np.asarray(f) for f in clip.frames]) for clip in clips]
    prompts = [rq.Prompt(clip.caption, i) for i, clip in enumerate(clips)]
    monkeypatch.setattr(rq, "JUDGE_WORKERS", 2)
    rows = rq.judge_videos(videos, prompts)
    for row, clip in zip(rows, clips):
        verdicts = judge_clip(list(clip.frames), clip.caption)
        assert row == {"objects": len(clip.objects), "kept": all(v.kept for v in verdicts),
                       "direction": all(v.moves_right for v in verdicts),
                       "color_direction": all(v.color_moves_right for v in verdicts),
                       "present": sum(v.present for v in verdicts) / len(verdicts)}  # fmt: skip
    assert all(row["kept"] and row["direction"] for row in rows)  # rendered clips: the ground truth holds
    monkeypatch.setattr(rq, "JUDGE_WORKERS", 0)
    assert rq.judge_videos(videos, prompts) == rows


def test_lora_clips_are_the_vae_latents_of_the_rendered_frames(tmp_path):
    """The extension's LoRA clips: each rendered clip's normalised VAE latents (train-lora's cached input) and its
    caption; train-lora's loader reads them back as they are."""
    from safetensors.torch import load_file

    from diffattn.loading import load_pipeline
    from diffattn.scenes import render_clip
    from diffattn.training import load_examples

    pipe = load_pipeline("shapes-wan", device="cpu")
    rq.write_clips(tmp_path, 2, 5, first=40, pipe=pipe)
    vae = pipe.vae
    for index in range(2):
        clip = render_clip(40 + index, 5)
        video = torch.tensor(np.stack([np.asarray(f) for f in clip.frames]), dtype=torch.float32)
        video = (video / 127.5 - 1).permute(3, 0, 1, 2)[None]
        with torch.no_grad():
            mode = vae.encode(video).latent_dist.mode()[0]
        mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
        stored = load_file(str(tmp_path / f"clip{index:04d}.safetensors"))["latents"]
        torch.testing.assert_close(stored, (mode - mean) / std)
        assert (tmp_path / f"clip{index:04d}.txt").read_text() == clip.caption
    examples = load_examples(pipe, tmp_path, num_frames=5, height=64, width=64, max_sequence_length=32)
    assert [e.name for e in examples] == ["clip0000", "clip0001"]
    assert torch.equal(examples[0].latents, load_file(str(tmp_path / "clip0000.safetensors"))["latents"])


def test_non_finite_videos_are_reported_not_silently_cast():
    """A video with NaN/inf values (a half-precision overflow) is counted by seed; its finite values stay as they are
    and the non-finite ones become 0, where a bare uint8 cast would give platform-dependent garbage."""

    class NaNPipe(_SeededVideoPipe):
        def __call__(self, prompt, generator, num_frames, output_type, **_):
            out = super().__call__(prompt, generator, num_frames, output_type)
            out.frames[1][0, 0, 0] = [np.nan, np.inf, 0.5]
            return out

    prompts = [rq.Prompt("a red circle moving left", 5), rq.Prompt("a red circle moving up", 9)]
    videos, timing = rq.timed_sample(NaNPipe(), prompts, stored=None, frames=3, steps=1, batch=2, defaults={})
    assert timing["non_finite_seeds"] == [9]
    clean = _sample(_SeededVideoPipe(), prompts)
    assert np.array_equal(videos[0], clean[0])  # the finite video is untouched
    assert list(videos[1][0, 0, 0]) == [0, 0, 128]
    assert np.array_equal(videos[1][1:], clean[1][1:])
    _, timing = rq.timed_sample(_SeededVideoPipe(), prompts, stored=None, frames=3, steps=1, batch=2, defaults={})
    assert timing["non_finite_seeds"] == []


def test_layout_judge_counts_copies_of_the_captioned_colour():
    import shapes_wan_layout as layout
    from PIL import Image, ImageDraw

    from diffattn.scenes import COLORS, draw_shape

    def frame(boxes, color="red", shape="square"):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for box in boxes:
            draw_shape(draw, shape, box, COLORS[color])
        return np.asarray(image)

    one = frame([(10, 10, 30, 30)])
    two = frame([(4, 10, 20, 26), (40, 10, 56, 26)])  # two copies 36 px apart
    other = frame([(10, 10, 30, 30)], color="blue")
    assert layout.frame_layout(one, "red", "square") == {"found": True, "regions": 1, "largest": "square"}
    assert layout.frame_layout(two, "red", "square") == {"found": True, "regions": 2, "largest": "square"}
    assert layout.frame_layout(one, "red", "circle")["found"] is False  # colour right, shape wrong
    assert layout.frame_layout(other, "red", "square") == {"found": False, "regions": 0, "largest": None}
    # per video: means over its frames (found in 2 of 3, the colour in 2 of 3, one region in 1 of 3, 1 region on
    # average); a red circle where a square was asked is the colour without the shape
    wrong_shape = frame([(10, 10, 30, 30)], shape="circle")
    rows = layout.judge_layout([np.stack([one, two, other, wrong_shape])], ["a red square moving left"])
    assert rows[0]["drawn"] == "square"  # the largest red region: a square in 2 frames, a circle in 1
    numbers = [{key: value for key, value in row.items() if key != "drawn"} for row in rows]
    assert numbers == [pytest.approx({"found": 2 / 4, "colour": 3 / 4, "one_region": 2 / 4, "regions": 1.0})]
    # per captioned shape: a red star video whose colour is drawn as a circle, beside that square video
    star = layout.judge_layout([np.stack([wrong_shape, other])], ["a red star moving up"])
    shapes = layout.by_shape(rows + star, ["a red square moving left", "a red star moving up"], ("found",))
    assert shapes["square"]["drawn"] == {"square": 1} and shapes["star"]["drawn"] == {"circle": 1}
    assert (shapes["square"]["found"]["mean"], shapes["star"]["found"]["mean"]) == (0.5, 0.0)


def test_shape_swap_overlaps_silhouettes_and_reads_what_each_caption_drew():
    import shapes_wan_shape_swap as swap
    from PIL import Image, ImageDraw

    from diffattn.scenes import COLORS, SHAPES, draw_shape

    def image(box, color, shape):
        canvas = Image.new("RGB", (64, 64), (255, 255, 255))
        draw_shape(ImageDraw.Draw(canvas), shape, box, COLORS[color])
        return np.asarray(canvas)

    left, right = (4, 4, 28, 28), (34, 4, 58, 28)
    square = image(left, "red", "square")
    assert swap.foreground_mask(square).sum() == 24 * 24  # the box's far edges are outside it
    assert swap.overlap(square, image(left, "blue", "square")) == 1.0  # another colour, the same pixels
    assert swap.overlap(square, image(right, "red", "square")) == 0.0
    shifted = image((16, 4, 40, 28), "red", "square")  # 12 of 24 columns shared: 12*24 / (36*24)
    assert swap.overlap(square, shifted) == pytest.approx(12 / 36)
    assert swap.overlap(np.full((8, 8, 3), 255, np.uint8), np.full((8, 8, 3), 255, np.uint8)) == 1.0
    # a model that ignores the shape word: every shape's caption draws the same red square (overlap 1, read as a
    # square); the colour word changes its colour only (overlap 1)
    colours = ["red", "blue"]
    ignored = {(0, c, s): image(left, c, "square") for c in colours for s in SHAPES}
    overlaps = swap.swap_overlaps(ignored, 1, colours)
    assert overlaps["shape_word"]["mean"] == 1.0 and overlaps["shape_word"]["n"] == 2 * 6
    assert overlaps["colour_word"]["mean"] == 1.0 and overlaps["colour_word"]["n"] == len(SHAPES)
    assert swap.confusion(ignored) == {shape: {"square": 2} for shape in SHAPES}
    # a model that draws each caption's shape (a star drawn blue where red was asked reads as "none")
    drawn = {(0, c, s): image(left, c, s) for c in colours for s in SHAPES}
    drawn[0, "red", "star"] = image(left, "blue", "star")
    read = swap.confusion(drawn)
    assert read == {"circle": {"circle": 2}, "square": {"square": 2}, "triangle": {"triangle": 2},
                    "star": {"star": 1, "none": 1}}  # fmt: skip
    assert swap.swap_overlaps(drawn, 1, colours)["shape_word"]["mean"] < 1.0
    prompts = swap.swap_prompts(2, colours)
    captions = [p.caption for p in prompts[:5]]
    assert captions == [f"a red {s} moving right" for s in SHAPES] + ["a blue circle moving right"]
    assert {p.seed for p in prompts[:8]} == {swap.SEED_BASE} and prompts[8].seed == swap.SEED_BASE + 1


def test_motion_geometry_measures_smear_along_the_motion_and_where_copies_lie():
    import shapes_wan_motion_geometry as geometry
    from PIL import Image, ImageDraw

    from diffattn.scenes import COLORS, HELD_OUT_CLIP_SEED, render_clip

    def frame(boxes, color="red"):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for box in boxes:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=COLORS[color])
        return np.asarray(image)

    smeared = frame([(4, 20, 44, 30)])  # 40 px wide, 10 tall
    stacked = frame([(10, 4, 30, 14), (10, 40, 30, 50)])  # two 20x10 bars, one above the other
    assert geometry.frame_geometry(smeared, "red", "horizontal") == {"log2_stretch": 2.0, "apart_along": None}
    assert geometry.frame_geometry(smeared, "red", "vertical") == {"log2_stretch": -2.0, "apart_along": None}
    assert geometry.frame_geometry(stacked, "red", "horizontal") == {"log2_stretch": 1.0, "apart_along": False}
    assert geometry.frame_geometry(stacked, "red", "vertical")["apart_along"] is True
    assert geometry.frame_geometry(smeared, "blue", "horizontal") is None
    # per axis: every 4th frame; a 4x stretch and a square average to 2x (log2 means), 1 of 1 two-region frames
    # apart across the motion; the blank frame and the unmeasured frames count for nothing
    square, blank = frame([(20, 20, 36, 36)]), frame([])
    # measured: frame 0 (4x stretch), 4 (blank: nothing), 8 (two bars, 2x each), 12 (a square); the rest not
    video = np.stack([smeared, square, square, square, blank, square, square, square, stacked, square, square, square,
                      square])  # fmt: skip
    out = geometry.video_geometry([video], ["a red square moving right"])
    assert out["horizontal"]["frames"] == 3 and out["horizontal"]["two_region_frames"] == 1
    assert out["horizontal"]["stretch_along_motion"]["mean"] == pytest.approx(2.0)  # 2 ** mean(2, 1, 0)
    assert out["horizontal"]["apart_along_motion"]["mean"] == 0.0
    assert out["vertical"] == {"frames": 0, "stretch_along_motion": None, "two_region_frames": 0,
                               "apart_along_motion": None}  # fmt: skip
    # rendered clips: the shapes are as long as they are wide, whichever way they move
    prompts = rq.held_out_prompts(4, 9, single_only=True)
    clips = [render_clip(HELD_OUT_CLIP_SEED + p.seed, 9) for p in prompts]
    rendered = geometry.video_geometry([np.stack([np.asarray(f) for f in c.frames]) for c in clips],
                                       [c.caption for c in clips])  # fmt: skip
    assert sum(rendered[axis]["frames"] for axis in geometry.AXES) == 4 * 3
    for axis in geometry.AXES:
        if rendered[axis]["frames"]:
            assert rendered[axis]["stretch_along_motion"]["mean"] == pytest.approx(1.0, abs=0.05)


def test_each_part_names_the_training_counters_of_the_weights_it_measured(tmp_path):
    (tmp_path / "training_state.json").write_text('{"vae_step": 5700, "denoiser_step": 9235, "calibrated": true}')
    assert rq.training_counters(str(tmp_path)) == {"vae_step": 5700, "decoder_step": 0, "denoiser_step": 9235}
    (tmp_path / "training_state.json").write_text('{"vae_step": 3, "decoder_step": 594, "denoiser_step": 7}')
    assert rq.training_counters(str(tmp_path)) == {"vae_step": 3, "decoder_step": 594, "denoiser_step": 7}
    shipped = rq.training_counters("shapes-wan")
    assert shipped["decoder_step"] > 0 and shipped["vae_step"] > 0 and shipped["denoiser_step"] > 0


def test_the_sampler_sweep_changes_one_setting_at_a_time_from_the_preset():
    import shapes_wan_sampler as sweep

    from diffattn.presets import PRESETS

    preset = PRESETS["shapes-wan"]
    args = SimpleNamespace(guidance=[2.0, 5.0, 8.0], steps=[40], shift=[3.0, 6.0], solver=["euler", "unipc"],
                           max_sequence_length=[32, 512], base_shift=3.0)  # fmt: skip
    runs = sweep.settings_to_run(args, preset)
    base = {"guidance_scale": 5.0, "steps": 20, "shift": 3.0, "solver": "euler", "max_sequence_length": 32}
    assert (preset.call_defaults["guidance_scale"], preset.steps, preset.call_defaults["max_sequence_length"]) == (
        5.0, 20, 32)  # fmt: skip
    assert runs[0] == {"name": "preset", **base}
    # the preset's own values (guidance 5, shift 3) are not sampled twice; every other run differs in one setting
    assert [r["name"] for r in runs[1:]] == ["guidance_scale 2", "guidance_scale 8", "steps 40", "shift 6",
                                             "solver unipc", "max_sequence_length 512"]  # fmt: skip
    for run in runs[1:]:
        changed = [key for key in base if run[key] != base[key]]
        assert len(changed) == 1 and run["name"].startswith(changed[0])
    # the schedulers: the preset's Euler at another shift, its stochastic variant, UniPC with flow prediction
    shipped = load_pipeline("shapes-wan").scheduler
    for solver, shift in (("euler", 6.0), ("euler-stochastic", 3.0), ("unipc", 3.0)):
        scheduler = sweep.make_scheduler(shipped.config, {"solver": solver, "shift": shift})
        scheduler.set_timesteps(20)
        # every solver walks the shifted flow-matching schedule sigma = s u / (1 + (s - 1) u), u evenly spaced from 1
        sigma = scheduler.sigmas[:20].double()
        unshifted = sigma / (shift - (shift - 1) * sigma)
        assert unshifted[0] == pytest.approx(1.0, abs=1e-5)
        steps = unshifted.diff()
        torch.testing.assert_close(steps, steps.mean().expand(19), rtol=1e-4, atol=1e-6)
        assert getattr(scheduler.config, "stochastic_sampling", False) == (solver == "euler-stochastic")
        assert type(scheduler).__name__ == ("UniPCMultistepScheduler" if solver == "unipc" else
                                            "FlowMatchEulerDiscreteScheduler")  # fmt: skip


def test_store_keys_the_scheduler_and_keeps_the_first_stores_keys(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffattn.presets import preset_path

    config = rq.RadialAttentionConfig(decay_factor=0.25)

    def folder(scheduler):
        pipe = _SeededVideoPipe()
        if scheduler is not None:
            pipe.scheduler = scheduler
        return rq.VideoStore(tmp_path, pipe, {"num_frames": 3}).variant("radial", config)

    # the shipped preset samples with the scheduler the first stores were made with: their keys are unchanged
    shipped = FlowMatchEulerDiscreteScheduler.from_pretrained(preset_path("shapes-wan"), subfolder="scheduler")
    assert rq.scheduler_setting(shipped) == rq.first_stores_scheduler()
    assert rq.scheduler_setting(shipped)["shift"] == 3.0
    assert folder(shipped) == folder(None) == folder(FlowMatchEulerDiscreteScheduler(shift=3.0))
    # another shift sets other noise levels: other videos, another folder
    assert folder(FlowMatchEulerDiscreteScheduler(shift=6.0)) != folder(shipped)
    assert folder(FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True)) != folder(shipped)


def test_table_formatting_against_hand_written_rows():
    import radial_quality_tables as tables

    assert tables.signed(-1.234, 2) == "\u22121.23" and tables.signed(0.5, 1) == "+0.5"
    stat = {"mean": 0.0891, "low": -0.0012, "high": 0.099, "n": 96}
    assert tables.with_interval(stat, 3, sign=True) == "+0.089 [\u22120.001, +0.099]"
    judge = {"single_object_videos": 4, "single_kept": 0.25, "single_direction": 0.75, "kept": 0.125,
             "direction": 0.5, "mean_presence": 0.3}  # fmt: skip
    variant = {"judge": judge, "presence": {"mean": 0.3, "low": 0.2, "high": 0.4, "n": 8}}
    extension = {"variants": dict.fromkeys(tables.EXTENSION_LABELS, variant)}
    assert (
        tables.extension_rows(extension)[0] == "| dense, as trained | 1 of 8 | 4 of 8 | 1 / 3 of 4 | 30% [20%, 40%] |"
    )
    part = {"weights": {"vae_step": 5700, "decoder_step": 594, "denoiser_step": 16589}}
    assert tables.weights_text(part) == (
        "measured on the weights at transformer step 16,589 (autoencoder 5,700 steps, its decoder 594 more)"
    )


def test_readme_tables_are_the_committed_json():
    """Every row the table writer makes from the committed CPU JSON, and the weights each table was measured on,
    stands in the README word for word, and the JSON's equal-density baselines have exactly the radial mask's block
    count."""
    import json

    import radial_quality_tables as tables

    report = json.loads(tables.DEFAULT_JSON.read_text())
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    written = tables.tables(report)
    assert set(written) == {"fidelity", "paired", "extension", "lora_time", "fidelity_weights", "extension_weights"}
    missing = [row for rows in written.values() for row in rows if row not in readme]
    assert not missing, f"README rows that differ from {tables.DEFAULT_JSON.name}: {missing}"
    variants = report["fidelity"]["variants"]
    assert {variants[name]["blocks"] for name in rq.BASELINES} == {variants["radial-0.25"]["blocks"]}
    sweep = tables.tables(json.loads(tables.SWEEP_JSON.read_text()))  # radial_fidelity_sweep.py's table too
    assert set(sweep) == {"sweep"} and len(sweep["sweep"]) == 8
    missing = [row for row in sweep["sweep"] if row not in readme]
    assert not missing, f"README rows that differ from {tables.SWEEP_JSON.name}: {missing}"


def test_noise_levels_denoise_as_wan_pipeline_does_and_noise_on_the_flow_matching_path():
    import shapes_wan_noise_levels as levels
    from PIL import Image, ImageDraw

    from diffattn.loading import load_pipeline
    from diffattn.scenes import COLORS

    pipe = load_pipeline("shapes-wan", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    call = {"height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0, "max_sequence_length": 32}
    captions = ["a red circle moving right", "a blue star moving up"]
    start = torch.randn(2, 8, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    # from step 0 the loop is WanPipeline's own: the same latents out of the same latents in
    expected = pipe(prompt=captions, latents=start, num_inference_steps=3, output_type="latent", **call).frames
    ours = levels.denoise_from(pipe, start, captions, start_step=0, steps=3, guidance=5.0, max_sequence_length=32)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    # a later start: the flow-matching mix diffusers' scheduler makes, and only the remaining steps run
    clean, noise = torch.randn(2, 8, 2, 8, 8), torch.randn(2, 8, 2, 8, 8)
    x = levels.noised(pipe, clean, noise, 2, 3)
    torch.testing.assert_close(x, pipe.scheduler.scale_noise(clean, pipe.scheduler.timesteps[2:3], noise))
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    levels.denoise_from(pipe, x, captions, start_step=2, steps=3, guidance=5.0, max_sequence_length=32)
    hook.remove()
    assert len(calls) == 2  # one step, conditional and unconditional
    # on its track: a red square whose centre is inside the ground-truth box in the first frame only
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((10, 10, 25, 25), fill=COLORS["red"])
    video = np.stack([np.asarray(image)] * 2)
    assert levels.colour_track(video, "red", [(8, 8, 28, 28), (40, 40, 60, 60)]) == (0.5, None)  # it never moves
    assert levels.colour_track(video, "blue", [(8, 8, 28, 28), (8, 8, 28, 28)]) == (0.0, None)
    # over the whole video: right for 10 frames, then back 4 frames; first to last it went right 5 px
    frames = []
    for x in [*range(10, 20), *range(18, 14, -1)]:
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        ImageDraw.Draw(image).rectangle((x, 30, x + 9, 39), fill=COLORS["red"])
        frames.append(np.asarray(image))
    assert levels.colour_track(np.stack(frames), "red", [(0, 0, 64, 64)] * 14) == (1.0, "right")
    # kept and presence per captioned shape
    rows = [{"kept": 1.0, "presence": 1.0}, {"kept": 0.0, "presence": 0.5}, {"kept": 0.0, "presence": 0.0}]
    captions = ["a red star moving up", "a blue star moving left", "a red circle moving up"]
    shapes = levels.by_shape(rows, captions, ("kept", "presence"))
    assert list(shapes) == ["circle", "star"] and [shapes[s]["videos"] for s in shapes] == [1, 2]
    assert (shapes["star"]["kept"]["mean"], shapes["star"]["presence"]["mean"]) == (0.5, 0.75)
    assert (shapes["circle"]["kept"]["mean"], shapes["circle"]["presence"]["mean"]) == (0.0, 0.0)


def test_noise_levels_pairs_with_stored_rows_of_the_same_prompts_and_refuses_others():
    import json

    import shapes_wan_noise_levels as levels

    results = Path(__file__).parent.parent / "benchmarks" / "results"
    shipped_json = results / "shapes_wan_varying" / "targets96-cpu.json"
    stored = json.loads(shipped_json.read_text())
    fields = {key: stored[key] for key in ("frames", "steps", "call", "prompts")}
    shipped = levels.stored_rows(shipped_json, "shapes-wan", fields)["0"]["videos"]
    mix = json.loads((results / "shapes_wan_images" / "mix_targets96-cpu.json").read_text())
    mix_rows = mix["models"]["runs/images_mix/pipeline"]["0"]["videos"]
    diff = levels.paired(mix_rows, shipped)
    # the two runs keep 13 and 8 of the same 96 videos (docs/shapes-wan.md): a mean difference of 5 / 96
    assert sum(r["kept"] for r in mix_rows) == 13 and sum(r["kept"] for r in shipped) == 8
    assert diff["kept"]["mean"] == pytest.approx(5 / 96) and diff["kept"]["n"] == 96
    assert diff["kept"]["low"] < 5 / 96 < diff["kept"]["high"]
    with pytest.raises(ValueError, match="cannot be paired"):
        levels.paired(mix_rows[:95], shipped)
    other_call = {**fields, "call": {**fields["call"], "max_sequence_length": 512}}
    with pytest.raises(ValueError, match="its call is"):
        levels.stored_rows(shipped_json, "shapes-wan", other_call)
    with pytest.raises(ValueError, match="no such model"):
        levels.stored_rows(shipped_json, "runs/nowhere", fields)


def test_the_fidelity_sweep_changes_one_radial_setting_at_a_time_and_its_full_mask_keeps_every_block(tmp_path):
    import json

    import radial_fidelity_sweep as sweep

    from diffattn.presets import PRESETS

    preset = PRESETS["shapes-wan"].radial
    named = sweep.variants(preset, [1.0], [3])
    assert named == {"decay 1": {"decay_factor": 1.0}, "dense first steps 3": {"dense_timesteps": 3},
                     "preset (decay 0.25, dense first steps 5)": {}, "every block": {}}  # fmt: skip
    geometry = (9, 256)  # shapes-wan's 33 frames of 64 px: 9 latent frames of 16 x 16 tokens
    radial = sweep.variant_mask(preset, geometry, full=False)
    assert torch.equal(radial, radial_block_mask(9, 256, block_size=16, decay_factor=0.25, sink_frames=1))
    assert bool(sweep.variant_mask(preset, geometry, full=True).all())
    out = tmp_path / "sweep.json"
    # 6 steps: the preset's first 5 dense, the last sparse; one video a variant
    assert (
        sweep.main(["--videos", "1", "--steps", "6", "--decays", "1.0", "--dense-steps", "3", "--out", str(out)]) == 0
    )
    rows = json.loads(out.read_text())["variants"]
    assert rows["every block"]["density"] == 1.0 and rows["decay 1"]["density"] == pytest.approx(
        float(radial_block_mask(9, 256, block_size=16, decay_factor=1.0, sink_frames=1).float().mean())
    )
    preset_row = rows["preset (decay 0.25, dense first steps 5)"]
    assert "paired_psnr_vs_preset" not in preset_row and preset_row["density"] == pytest.approx(
        float(radial.float().mean())
    )
    # dense attention through the same kernel differs from dense by rounding alone; the radial mask by more
    assert rows["every block"]["psnr"]["mean"] > max(40, preset_row["psnr"]["mean"])
    with pytest.raises(SystemExit):
        sweep.main(["--videos", "1", "--steps", "6", "--dense-steps", "6", "--out", str(out)])
