"""train-shapes-video at a tiny scale: the phases run, a resumed run continues where the first stopped, the export
loads with from_pretrained as a WanPipeline and generates a clip of the trained geometry."""

import json

import numpy as np
import pytest
import torch

from diffattn.shapes_video_training import (
    MAX_SEQUENCE_LENGTH,
    ShapesVideoTrainingConfig,
    clip_batch,
    encode_captions,
    object_weights,
    train_shapes_video,
)


def _config(**changes):
    base = {"vae_steps": 2, "vae_frames": 5, "vae_batch_size": 1, "denoiser_steps": 2, "num_frames": 5,
            "batch_size": 1, "checkpoint_every": 1, "log_every": 1, "device": "cpu"}  # fmt: skip
    return ShapesVideoTrainingConfig(**{**base, **changes})


def test_phases_resume_and_export_a_loadable_wan_pipeline(tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    out = tmp_path / "run"
    state = train_shapes_video(out, _config())
    assert (state["vae_step"], state["denoiser_step"], state["calibrated"]) == (2, 2, True)
    assert len(state["latents_std"]) == 8 and all(s > 0 for s in state["latents_std"])
    again = train_shapes_video(out, _config(denoiser_steps=3))  # resumes: one more denoiser step, no VAE step
    assert (again["vae_step"], again["denoiser_step"]) == (2, 3)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("vae", 0), ("vae", 1), ("denoiser", 0), ("denoiser", 1),
                                                       ("denoiser", 2)]  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", use_safetensors=True, torch_dtype=torch.float32)
    assert isinstance(pipe, WanPipeline) and pipe.vae.config.latents_std == again["latents_std"]
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
    video = pipe("a red circle moving right", num_frames=5, height=64, width=64, num_inference_steps=2,
                 max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0),
                 output_type="np").frames[0]  # fmt: skip
    assert video.shape == (5, 64, 64, 3) and np.isfinite(video).all()
    assert json.loads((out / "pipeline" / "training_state.json").read_text())["denoiser_step"] == 3
    # continued in a new folder from the export (another session), then resumed from that folder's checkpoint
    second = tmp_path / "continued"
    started = train_shapes_video(second, _config(denoiser_steps=4), init_from=out / "pipeline")
    resumed = train_shapes_video(second, _config(denoiser_steps=5))
    assert (started["denoiser_step"], resumed["denoiser_step"]) == (4, 5)
    assert started["latents_std"] == resumed["latents_std"] == again["latents_std"]
    exported = json.loads((second / "pipeline" / "training_state.json").read_text())
    assert exported["latents_mean"] == again["latents_mean"]


def test_captions_are_encoded_as_the_pipeline_encodes_prompts():
    from diffattn.presets.shapes_video import build_shapes_wan

    pipe = build_shapes_wan()
    for length in (MAX_SEQUENCE_LENGTH, 512):  # the preset's call default and WanPipeline's own
        ours = encode_captions(pipe.tokenizer, pipe.text_encoder, ["a blue star moving up", ""], torch.device("cpu"),
                               length)  # fmt: skip
        theirs, _ = pipe.encode_prompt(["a blue star moving up", ""], do_classifier_free_guidance=False,
                                       max_sequence_length=length)  # fmt: skip
        assert ours.shape[1] == length
        torch.testing.assert_close(ours, theirs)


def test_caption_lengths_are_drawn_per_step_after_every_other_draw():
    """`caption_lengths`: each step pads its captions to one of the lengths, drawn from the step's generator after
    its clips, dropout, noise and noise levels, which stay those of a run with one length."""
    from diffattn.presets.shapes_video import build_shapes_wan
    from diffattn.shapes_video_training import _DenoiserClips

    tokenizer = build_shapes_wan(0).tokenizer
    one = _DenoiserClips(_config(denoiser_steps=12, batch_size=2), tokenizer, 8, 4, 4)
    both = _DenoiserClips(_config(denoiser_steps=12, batch_size=2, caption_lengths=(32, 512)), tokenizer, 8, 4, 4)
    seen = set()
    for step in range(12):
        pixels, ids, mask, noise, sigma = both[step]
        reference = one[step]
        assert reference[1].shape == (2, MAX_SEQUENCE_LENGTH)
        assert torch.equal(pixels, reference[0]) and torch.equal(noise, reference[3])
        assert torch.equal(sigma, reference[4])
        length = ids.shape[1]
        seen.add(length)
        assert length in (32, 512) and mask.shape == (2, length)
        # the same captions' tokens, then only padding (masked off) up to the drawn length
        assert torch.equal(ids[:, :32], reference[1]) and torch.equal(mask[:, :32], reference[2])
        assert bool((ids[:, 32:] == tokenizer.pad_token_id).all()) and not bool(mask[:, 32:].any())
    assert seen == {32, 512}  # both drawn in 12 steps (each with probability 1 - 2 ** -11)


def test_clip_batches_and_bad_configs():
    video, captions = clip_batch(0, 2, 9)
    assert video.shape == (2, 3, 9, 64, 64) and video.min() >= -1 and video.max() <= 1 and len(captions) == 2
    with pytest.raises(ValueError, match="num_frames=8 is not allowed: expected 4k \\+ 1 frames"):
        ShapesVideoTrainingConfig(num_frames=8)
    with pytest.raises(ValueError, match="lr=nan is not allowed"):
        ShapesVideoTrainingConfig(lr=float("nan"))
    with pytest.raises(ValueError, match=r"timestep_shift=0.5 is not allowed: expected a number in \[1, 100\]"):
        ShapesVideoTrainingConfig(timestep_shift=0.5)
    with pytest.raises(ValueError, match=r"device='cuda:99' is not available: torch sees \d+ CUDA GPU"):
        ShapesVideoTrainingConfig(device="cuda:99")


def test_the_transformers_clips_can_be_slow_and_without_bounces():
    """`clip_speeds` / `clip_bounce` pick the denoiser's clips (render_clip's options), refused when they cannot
    fit."""
    from diffattn.presets.shapes_video import build_shapes_wan
    from diffattn.scenes import render_clip
    from diffattn.shapes_video_training import _DenoiserClips

    config = _config(batch_size=3, clip_speeds=(1,), clip_bounce=False, num_frames=9)
    pixels = _DenoiserClips(config, build_shapes_wan(0).tokenizer, 8, 4, 4)[2][0]
    first = config.seed * 10**7 + 5 * 10**6 + 2 * 3  # step 2's first clip
    expected = render_clip(first, 9, speeds=(1,), bounce=False).frames
    assert torch.equal(pixels[0], torch.from_numpy(np.stack([np.asarray(f) for f in expected])))
    with pytest.raises(ValueError, match=r"bounce=False with speeds=\(1, 2\) and num_frames=33 is not allowed"):
        ShapesVideoTrainingConfig(clip_bounce=False)
    with pytest.raises(ValueError, match="speeds=0 is not allowed"):
        ShapesVideoTrainingConfig(clip_speeds=(0,))
    with pytest.raises(ValueError, match="clip_bounce='no' is not allowed: expected True or False"):
        ShapesVideoTrainingConfig(clip_bounce="no")
    varying = _config(batch_size=3, clip_speeds=(1,), clip_bounce=False, clip_steady=False, num_frames=9)
    pixels = _DenoiserClips(varying, build_shapes_wan(0).tokenizer, 8, 4, 4)[2][0]
    expected = render_clip(first, 9, speeds=(1,), bounce=False, steady=False).frames
    assert torch.equal(pixels[0], torch.from_numpy(np.stack([np.asarray(f) for f in expected])))
    with pytest.raises(ValueError, match="clip_steady=1 is not allowed: expected True or False"):
        ShapesVideoTrainingConfig(clip_steady=1)
    with pytest.raises(ValueError, match=r"caption_lengths=16 is not allowed: expected an int in \[32, 1024\]"):
        ShapesVideoTrainingConfig(caption_lengths=(32, 16))
    for bad in ((), "512", 512):
        with pytest.raises(ValueError, match="caption_lengths=.* is not allowed: expected one or more token counts"):
            ShapesVideoTrainingConfig(caption_lengths=bad)
    assert ShapesVideoTrainingConfig(caption_lengths=[32, 512]).caption_lengths == (32, 512)


def test_the_command_trains_and_exports(tmp_path, capsys):
    from diffattn.cli import main

    out = tmp_path / "cli-run"
    argv = ["train-shapes-video", "--out", str(out), "--vae-steps", "1", "--denoiser-steps", "1", "--batch-size", "1",
            "--vae-batch-size", "1", "--device", "cpu"]  # fmt: skip
    # the command trains 33-frame clips; one step of each phase is enough to check it wires up
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"{out / 'pipeline'} (vae step 1, decoder step 0, denoiser step 1)"
    assert (out / "pipeline" / "model_index.json").is_file()


def test_unclamped_decoding_is_the_decoder_before_its_clamp():
    """The autoencoder trains on the decoder's output before diffusers' clamp to [-1, 1] (the clamp has no gradient
    past the range: an autoencoder overshooting white never learns the shapes)."""
    from diffattn.presets.shapes_video import build_shapes_wan
    from diffattn.shapes_video_training import decode_unclamped

    vae = build_shapes_wan().vae
    latents = torch.randn(1, 8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    raw = decode_unclamped(vae, latents)
    clamped = vae.decode(latents).sample
    assert raw.shape == clamped.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(raw.clamp(-1, 1), clamped)
    assert (raw.abs() > 1).any()  # there was something to clamp
    raw.abs().mean().backward()  # and the gradient reaches the decoder
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_crops_and_warmup_clips(tmp_path, monkeypatch):
    import diffattn.shapes_video_training as training
    from diffattn.shapes_video_training import _random_crop

    video, _ = clip_batch(0, 2, 5)
    crop = _random_crop(video, 32, seed=7)
    assert crop.shape == (2, 3, 5, 32, 32)
    assert torch.equal(crop, _random_crop(video, 32, seed=7))  # seeded
    assert any(torch.equal(crop, video[..., y : y + 32, x : x + 32]) for y in range(33) for x in range(33))
    assert len({tuple(_random_crop(video, 32, seed=s).flatten().tolist()) for s in range(6)}) > 1
    assert torch.equal(_random_crop(video, 64, seed=0), video)  # a whole frame: unchanged
    with pytest.raises(ValueError, match="vae_crop=30 is not allowed"):
        ShapesVideoTrainingConfig(vae_crop=30)
    with pytest.raises(ValueError, match="warmup_frames=16 is not allowed: expected 4k \\+ 1 frames"):
        ShapesVideoTrainingConfig(warmup_frames=16, warmup_steps=10)
    # the first warmup_steps denoiser steps train on the short clips, then the full length
    lengths = []

    original = training.clip_pixels

    def recording(start, size, num_frames, *options):
        lengths.append((num_frames, size))
        return original(start, size, num_frames, *options)

    monkeypatch.setattr(training, "clip_pixels", recording)
    config = _config(vae_crop=32, warmup_frames=1, warmup_steps=1, denoiser_steps=4, image_every=3, image_batch_size=2)
    state = train_shapes_video(tmp_path / "run", config)
    assert state["denoiser_step"] == 4
    assert lengths[:2] == [(5, 1), (5, 1)]  # the autoencoder's clips (5 frames, cropped)
    # one warmup step on 1-frame clips, then 5-frame clips, but every third step on 2 single frames
    assert lengths[-4:] == [(1, 1), (5, 1), (1, 2), (5, 1)]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    phases = [(r["phase"], r["step"]) for r in log if r["phase"].startswith("denoiser")]
    assert phases == [("denoiser", 0), ("denoiser", 1), ("denoiser-images", 2), ("denoiser", 3)]  # a curve each


def test_image_steps_train_single_frames_of_their_own_stream_and_leave_the_clip_steps_as_they_were():
    """`image_every`: every image_every-th step's item is image_batch_size single frames (render_clip's, of seeds
    no clip step draws), with noise of one latent frame; every other step's item is the run's without the option."""
    from diffattn.presets.shapes_video import build_shapes_wan
    from diffattn.scenes import render_clip
    from diffattn.shapes_video_training import _DenoiserClips

    tokenizer = build_shapes_wan(0).tokenizer
    plain = _DenoiserClips(_config(denoiser_steps=6, batch_size=2), tokenizer, 8, 4, 4)
    mixed = _DenoiserClips(_config(denoiser_steps=6, batch_size=2, image_every=3, image_batch_size=3), tokenizer,
                           8, 4, 4)  # fmt: skip
    clip_seeds = set()
    for step in range(6):
        item, reference = mixed[step], plain[step]
        first = 5 * 10**6 + 2 * step  # DENOISER_STREAM, seed 0
        clip_seeds.update(range(first, first + 2))
        if step in (2, 5):
            pixels, noise = item[0], item[3]
            assert pixels.shape == (3, 1, 64, 64, 3) and noise.shape == (3, 8, 1, 16, 16) and item[1].shape[0] == 3
            seeds = range(8 * 10**6 + 3 * step, 8 * 10**6 + 3 * step + 3)
            for frame, seed in zip(pixels, seeds):
                assert np.array_equal(frame[0].numpy(), np.asarray(render_clip(seed, 1).frames[0]))
            assert not clip_seeds & set(seeds)
        else:
            for ours, theirs in zip(item, reference):
                assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="image_every=-1 is not allowed"):
        ShapesVideoTrainingConfig(image_every=-1)
    with pytest.raises(ValueError, match="image_batch_size=0 is not allowed"):
        ShapesVideoTrainingConfig(image_batch_size=0)


def test_the_command_passes_its_ema_decay_heads_and_shift(tmp_path, monkeypatch, capsys):
    import diffattn.shapes_video_training as training
    from diffattn.cli import main

    seen = []
    monkeypatch.setattr(training, "train_shapes_video",
                        lambda out, config, **kw: seen.append(config) or {"vae_step": 0, "decoder_step": 0,
                                                                          "denoiser_step": 0})  # fmt: skip
    argv = ["train-shapes-video", "--out", str(tmp_path), "--ema-decay", "0.99", "--attention-heads", "2",
            "--timestep-shift", "3", "--decoder-steps", "7", "--decoder-frames", "17", "--decoder-lr", "1e-4",
            "--object-weight", "3", "--clip-speeds", "1", "--no-bounce", "--varying-speed", "--image-every", "4",
            "--image-batch-size", "24"]  # fmt: skip
    assert main(argv) == 0
    assert main(["train-shapes-video", "--out", str(tmp_path)]) == 0
    assert [(c.ema_decay, c.attention_heads, c.timestep_shift) for c in seen] == [(0.99, 2, 3.0), (0.999, 4, 1.0)]
    assert [c.object_weight for c in seen] == [3.0, 0.0]
    assert [(c.image_every, c.image_batch_size) for c in seen] == [(4, 24), (0, 32)]
    assert [(c.clip_speeds, c.clip_bounce, c.clip_steady) for c in seen] == [
        ((1,), False, False),
        ((1, 2), True, True),
    ]
    assert [(c.decoder_steps, c.decoder_frames, c.decoder_lr) for c in seen] == [(7, 17, 1e-4), (0, 33, 3e-4)]
    assert main(["train-shapes-video", "--out", str(tmp_path), "--ema-decay", "1.5"]) == 2
    assert "ema_decay=1.5 is not allowed" in capsys.readouterr().err


def test_the_commands_without_flags_train_the_configs_defaults(tmp_path, monkeypatch):
    """The trainers' flags take their defaults from the config dataclasses: a bare command trains exactly what
    `ShapesVideoTrainingConfig()` / `ShapesTrainingConfig()` train from the API."""
    import diffattn.shapes_training as image_training
    import diffattn.shapes_video_training as training
    from diffattn.cli import main
    from diffattn.shapes_training import ShapesTrainingConfig

    seen = []
    monkeypatch.setattr(training, "train_shapes_video", lambda out, config, **kw: seen.append(config) or
                        {"vae_step": 0, "decoder_step": 0, "denoiser_step": 0})  # fmt: skip
    monkeypatch.setattr(image_training, "train_shapes", lambda out, config, **kw: seen.append(config) or
                        {"vae_step": 0, "unet_step": 0})  # fmt: skip
    assert main(["train-shapes-video", "--out", str(tmp_path / "v")]) == 0
    assert main(["train-shapes", "--out", str(tmp_path / "i")]) == 0
    assert seen == [ShapesVideoTrainingConfig(), ShapesTrainingConfig()]


def test_object_weights_cover_the_latent_positions_of_an_object_and_their_neighbours():
    """A causal Wan VAE at 4x: latent frame 0 is frame 0, latent frame j >= 1 frames 4j-3..4j; a latent position 4x4
    pixels. One coloured pixel in frame 6 at (row 9, column 22) is latent frame 2, position (2, 5): it and its eight
    neighbours weigh 1 + 3, everything else 1; a white clip weighs 1 everywhere."""
    pixels = torch.full((2, 9, 16, 32, 3), 255, dtype=torch.uint8)
    pixels[1, 6, 9, 22] = torch.tensor([250, 0, 0], dtype=torch.uint8)
    weight = object_weights(pixels, 3.0, time_factor=4, space_factor=4)
    expected = torch.ones(2, 1, 3, 4, 8)
    expected[1, 0, 2, 1:4, 4:7] = 4.0
    torch.testing.assert_close(weight, expected)
    pixels[0, 0, 0, 0] = torch.tensor([255, 255, 200], dtype=torch.uint8)  # a pale yellow pixel counts as an object
    assert object_weights(pixels, 1.0, 4, 4)[0, 0, 0, :2, :2].eq(2.0).all()


def test_the_run_weighs_its_loss_by_the_objects_of_its_clips_when_asked(tmp_path, monkeypatch):
    import diffattn.shapes_video_training as training

    weights = []
    real = training.flow_matching_loss

    def recording(transformer, latents, embeds, noise, sigma, weight=None):
        weights.append(weight)
        return real(transformer, latents, embeds, noise, sigma, weight)

    monkeypatch.setattr(training, "flow_matching_loss", recording)
    train_shapes_video(tmp_path / "plain", _config(denoiser_steps=1))
    train_shapes_video(tmp_path / "weighted", _config(denoiser_steps=1, object_weight=2.0))
    plain, weighted = weights
    assert plain is None and weighted.shape == (1, 1, 2, 16, 16)  # 5 frames: 2 latent frames of 16x16
    assert set(weighted.unique().tolist()) == {1.0, 3.0}  # the clip's object, and its background


def test_attention_heads_split_the_same_width_and_a_run_keeps_its_split(tmp_path, caplog):
    from diffusers import DiffusionPipeline

    from diffattn.presets.shapes_video import build_shapes_wan

    four, two = build_shapes_wan().transformer, build_shapes_wan(attention_heads=2).transformer
    assert (four.config.num_attention_heads, four.config.attention_head_dim) == (4, 24)
    assert (two.config.num_attention_heads, two.config.attention_head_dim) == (2, 48)
    # Wan's rotary embedding gives each spatial axis 2 * (head_dim // 6) dimensions: 8 of 24, 16 of 48
    assert (four.rope.h_dim, four.rope.w_dim, two.rope.h_dim, two.rope.w_dim) == (8, 8, 16, 16)
    assert {k: v.shape for k, v in four.state_dict().items()} == {k: v.shape for k, v in two.state_dict().items()}
    with pytest.raises(ValueError, match="attention_heads=3 is not allowed: expected one of 1, 2, 4"):
        build_shapes_wan(attention_heads=3)
    with pytest.raises(ValueError, match="attention_heads=3 is not allowed"):
        ShapesVideoTrainingConfig(attention_heads=3)

    first = tmp_path / "four"
    train_shapes_video(first, _config())
    second = tmp_path / "two"
    with caplog.at_level("WARNING", logger="diffattn.shapes_video_training"):
        train_shapes_video(
            second, _config(denoiser_steps=2, attention_heads=2, ema_decay=0), init_from=first / "pipeline"
        )
    assert "has 4 attention heads, this run 2: its weights are re-split" in caplog.text
    exported = DiffusionPipeline.from_pretrained(second / "pipeline", use_safetensors=True, torch_dtype=torch.float32)
    assert exported.transformer.config.num_attention_heads == 2
    # the run resumes only with the split it trains
    with pytest.raises(ValueError, match="attention_heads=4 is not allowed for .*checkpoint.pt: its run trains 2"):
        train_shapes_video(second, _config(denoiser_steps=3))
    assert train_shapes_video(second, _config(denoiser_steps=3, attention_heads=2))["denoiser_step"] == 3


def test_the_transformer_size_is_a_choice_a_run_keeps_and_the_preset_budget_bounds(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from diffattn.cli import main
    from diffattn.presets.shapes_video import build_shapes_wan

    wide = build_shapes_wan(width=192, num_layers=2, ffn_dim=128).transformer
    assert (wide.config.num_attention_heads, wide.config.attention_head_dim) == (4, 48)
    assert (len(wide.blocks), wide.blocks[0].ffn.net[0].proj.out_features) == (2, 128)
    assert wide.blocks[0].attn1.to_q.weight.shape == (192, 192)
    shipped = build_shapes_wan().transformer
    assert (len(shipped.blocks), shipped.blocks[0].attn1.to_q.weight.shape[0]) == (4, 96)
    with pytest.raises(ValueError, match=r"width=100 is not allowed: expected a multiple of 24 in \[24, 384\]"):
        build_shapes_wan(width=100)
    with pytest.raises(ValueError, match=r"num_layers=0 is not allowed: expected an int in \[1, 12\]"):
        ShapesVideoTrainingConfig(num_layers=0)
    # the fp16 export of 384 wide, 12 blocks and a 2048 feed-forward weighs ~60 MB: refused before a step
    with pytest.raises(ValueError, match=r"ffn_dim=2048 is not allowed: the exported pipeline would hold \d+\.\d MB"):
        train_shapes_video(tmp_path / "huge", _config(width=384, num_layers=12, ffn_dim=2048))
    assert not (tmp_path / "huge" / "checkpoint.pt").exists()

    narrow = tmp_path / "narrow"
    assert main(["train-shapes-video", "--out", str(narrow), "--vae-steps", "2", "--vae-frames", "5",
                 "--vae-batch-size", "1", "--denoiser-steps", "2", "--batch-size", "1", "--device", "cpu",
                 "--width", "48", "--layers", "1", "--ffn-dim", "32", "--attention-heads", "2"]) == 0  # fmt: skip
    exported = DiffusionPipeline.from_pretrained(narrow / "pipeline", use_safetensors=True, torch_dtype=torch.float32)
    config = exported.transformer.config
    assert (config.num_attention_heads * config.attention_head_dim, config.num_layers, config.ffn_dim) == (48, 1, 32)
    # a run resumes only at its own size; another size continuing its export must start a new transformer
    with pytest.raises(ValueError, match="width=96 is not allowed for .*checkpoint.pt: its run trains 48 "
                       r"\(pass --width 48, or --fresh\)"):  # fmt: skip
        train_shapes_video(narrow, _config(denoiser_steps=3, attention_heads=2, num_layers=1, ffn_dim=32))
    small = {"attention_heads": 2, "width": 48, "ffn_dim": 32}
    with pytest.raises(ValueError, match="num_layers=2 is not allowed with init_from=.*narrow/pipeline'?: its "
                       "transformer has num_layers=1"):  # fmt: skip
        train_shapes_video(tmp_path / "deeper", _config(num_layers=2, **small), init_from=narrow / "pipeline")
    deeper = train_shapes_video(tmp_path / "deeper", _config(num_layers=2, **small), init_from=narrow / "pipeline",
                                init_vae_only=True)  # fmt: skip
    assert (deeper["vae_step"], deeper["denoiser_step"]) == (2, 2)


@pytest.mark.parametrize("head_dim", [24, 48, 96])
def test_rotary_pairs_are_diffusers_wan_layout(head_dim):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from diffattn.shapes_video_training import rotary_pairs

    rope = WanRotaryPosEmbed(head_dim, (1, 1, 1), max_seq_len=8)
    # the angle each channel pair turns from position 0 to 1 is its frequency; the split sizes give its axis
    angles = torch.atan2(rope.freqs_sin[1, 0::2], rope.freqs_cos[1, 0::2]).tolist()
    axes = ["t"] * (rope.t_dim // 2) + ["h"] * (rope.h_dim // 2) + ["w"] * (rope.w_dim // 2)
    pairs = rotary_pairs(head_dim)
    assert [axis for axis, _ in pairs] == axes
    assert [freq for _, freq in pairs] == pytest.approx(angles, rel=1e-6)


def test_rotary_matched_channels_keep_axes_pairs_and_groups():
    from diffattn.shapes_video_training import rotary_matched_channels, rotary_pairs

    order = rotary_matched_channels(96, 4, 2).tolist()
    # hand-computed: the first time pairs of the merged head 0 come from old head 0's fastest pair (channels 0-1),
    # old head 1's fastest (24-25), old head 0's second (2-3), old head 1's second (26-27)
    assert order[:8] == [0, 1, 24, 25, 2, 3, 26, 27]
    for old, new in [(4, 2), (4, 1), (2, 1), (2, 4), (1, 4), (1, 2)]:
        order = rotary_matched_channels(96, old, new).tolist()
        assert sorted(order) == list(range(96))
        assert all(order[i] % 2 == 0 and order[i + 1] == order[i] + 1 for i in range(0, 96, 2))
        old_axis = [axis for axis, _ in rotary_pairs(96 // old)] * old
        new_axis = [axis for axis, _ in rotary_pairs(96 // new)] * new
        assert all(new_axis[c // 2] == old_axis[order[c] // 2] for c in range(0, 96, 2))
        group = 96 // min(old, new)
        assert all(c // group == order[c] // group for c in range(96))
        back = rotary_matched_channels(96, new, old)
        assert torch.equal(torch.tensor(order)[back], torch.arange(96))  # re-splitting back restores the layout
    assert torch.equal(rotary_matched_channels(96, 4, 4), torch.arange(96))


def test_resplit_merged_heads_compute_what_the_old_heads_did():
    """With every odd head of a 4-head model silenced (its query, key and value rows zero), merging pairs of heads
    into 2 heads must not change the model's output: each merged head is the even head alone, on the same rotary
    frequencies and logit scale. Loading the same weights without the re-split changes it."""
    from diffattn.presets.shapes_video import build_shapes_wan
    from diffattn.shapes_video_training import resplit_attention_heads

    four = build_shapes_wan(attention_heads=4).transformer.eval()
    state = four.state_dict()
    for key in state:
        module = key.split(".")[-2] if "." in key else ""
        if module in ("to_q", "to_k", "to_v") and ".attn" in key:
            for head in (1, 3):
                state[key][head * 24 : (head + 1) * 24] = 0
        if module in ("norm_q", "norm_k"):
            state[key].uniform_(0.5, 2.0)  # untrained norms are ones: make the scale and order matter
    four.load_state_dict(state)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 8, 3, 8, 8, generator=generator)
    text = torch.randn(1, 6, 64, generator=generator)
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        expected = four(latents, timestep, text, return_dict=False)[0]
        two = build_shapes_wan(attention_heads=2).transformer.eval()
        two.load_state_dict(resplit_attention_heads(state, 96, 4, 2))
        torch.testing.assert_close(two(latents, timestep, text, return_dict=False)[0], expected, atol=1e-5, rtol=1e-4)
        two.load_state_dict(state)
        assert (two(latents, timestep, text, return_dict=False)[0] - expected).abs().max() > 1e-2


def test_workers_render_the_same_clips_as_the_training_process(tmp_path):
    """Clips rendered ahead in worker processes train exactly the weights that rendering in the loop does."""
    from diffattn.presets.shapes_video import build_shapes_wan
    from diffattn.scenes import render_clip
    from diffattn.shapes_training import load_checkpoint
    from diffattn.shapes_video_training import _DenoiserClips, clip_pixels, pixels_to_video, tokenize_captions

    config = _config(denoiser_steps=2, batch_size=2, ema_decay=0, caption_dropout=0.0, timestep_shift=3.0)
    tokenizer = build_shapes_wan(0).tokenizer
    pixels, ids, mask, noise, sigma = _DenoiserClips(config, tokenizer, 8, 4, 4)[1]
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 5, 64, 64, 3)
    reference, reference_captions = clip_batch(config.seed * 10**7 + 5 * 10**6 + 2, 2, 5)  # step 1's two clips
    assert torch.equal(pixels_to_video(pixels), reference)
    assert torch.equal(ids, tokenize_captions(tokenizer, reference_captions)[0]) and mask.shape == ids.shape
    # a 5-frame 64 px clip is 2 latent frames of 16 x 16 (the VAE's 4x in time and space); sigma shifted by 3
    assert noise.shape == (2, 8, 2, 16, 16) and sigma.shape == (2,) and bool(((sigma > 0) & (sigma < 1)).all())
    dropped = _DenoiserClips(_config(**{**vars(config), "caption_dropout": 1.0}), tokenizer, 8, 4, 4)[1]
    assert torch.equal(dropped[1], tokenize_captions(tokenizer, ["", ""])[0])  # dropped captions: empty prompts
    assert torch.equal(dropped[3], noise) and torch.equal(dropped[4], sigma)  # the same draws otherwise
    frames = np.stack([np.asarray(f) for f in render_clip(7, 5).frames])  # [F, H, W, 3] uint8
    assert torch.equal(clip_pixels(7, 1, 5)[0][0], torch.from_numpy(frames))
    weights = []
    for workers in (0, 2):
        train_shapes_video(tmp_path / f"w{workers}", _config(**{**vars(config), "num_workers": workers}))
        weights.append(load_checkpoint(tmp_path / f"w{workers}" / "checkpoint.pt", "cpu")["models"]["transformer"])
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    with pytest.raises(ValueError, match="num_workers"):
        ShapesVideoTrainingConfig(num_workers=-1)


def test_init_vae_only_keeps_the_autoencoder_and_starts_a_fresh_denoiser(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from diffattn.cli import main
    from diffattn.presets.shapes_video import build_shapes_wan

    first = tmp_path / "first"
    train_shapes_video(first, _config())
    source = DiffusionPipeline.from_pretrained(first / "pipeline", use_safetensors=True, torch_dtype=torch.float32)
    second = tmp_path / "second"
    # no denoiser step: the export is the autoencoder it started from and an untrained transformer of 2 heads
    state = train_shapes_video(second, _config(denoiser_steps=0, attention_heads=2, ema_decay=0),
                               init_from=first / "pipeline", init_vae_only=True)  # fmt: skip
    assert (state["vae_step"], state["denoiser_step"], state["calibrated"]) == (2, 0, True)
    started = DiffusionPipeline.from_pretrained(second / "pipeline", use_safetensors=True, torch_dtype=torch.float32)
    assert started.vae.config.latents_mean == source.vae.config.latents_mean
    for name, value in source.vae.state_dict().items():
        assert torch.equal(started.vae.state_dict()[name], value), name
    fresh = build_shapes_wan(0, attention_heads=2)  # the run's seed: what an untrained build holds, fp16-rounded
    for part in ("transformer", "text_encoder"):
        for name, value in getattr(fresh, part).state_dict().items():
            assert torch.equal(getattr(started, part).state_dict()[name], value.half().float()), (part, name)
    # it trains on from there (resumes its own checkpoint, denoiser steps counted from 0)
    assert train_shapes_video(second, _config(denoiser_steps=2, attention_heads=2))["denoiser_step"] == 2
    # an autoencoder that is not calibrated yet is refused, and the flag needs a folder
    import shutil

    half = tmp_path / "half"
    shutil.copytree(first / "pipeline", half)
    saved = json.loads((half / "training_state.json").read_text())
    (half / "training_state.json").write_text(json.dumps({**saved, "calibrated": False}))
    with pytest.raises(ValueError, match="is not allowed with vae_only: its autoencoder is not calibrated"):
        train_shapes_video(tmp_path / "third", _config(), init_from=half, init_vae_only=True)
    with pytest.raises(ValueError, match="init_vae_only=True is not allowed without init_from"):
        train_shapes_video(tmp_path / "third", _config(), init_vae_only=True)
    assert main(["train-shapes-video", "--out", str(tmp_path / "x"), "--init-vae-only"]) == 2
    assert "--init-vae-only is not allowed without --init-from" in capsys.readouterr().err


def test_decoder_phase_trains_the_decoder_on_long_clips_and_keeps_the_latents(tmp_path, capsys):
    """--decoder-steps: after calibration, the decoder alone on clips of decoder_frames frames. The encoder (so the
    latents the transformer learnt, and their calibration) and the transformer stay bit for bit; the logged loss of
    the first step is the MSE of the unclamped reconstruction of that step's seeded 9-frame clips."""
    from diffusers import DiffusionPipeline

    from diffattn.cli import main
    from diffattn.shapes_video_training import DECODER_STREAM, _random_crop, decode_unclamped

    first = tmp_path / "first"
    train_shapes_video(first, _config())
    source = DiffusionPipeline.from_pretrained(first / "pipeline", use_safetensors=True, torch_dtype=torch.float32)
    video, _ = clip_batch(DECODER_STREAM, 1, 9)
    video = _random_crop(video, 64, DECODER_STREAM)
    with torch.no_grad():
        latents = source.vae.encode(video).latent_dist.sample(generator=torch.Generator().manual_seed(DECODER_STREAM))
        expected = torch.nn.functional.mse_loss(decode_unclamped(source.vae, latents), video).item()
    second = tmp_path / "second"
    config = _config(denoiser_steps=2, decoder_steps=2, decoder_frames=9, ema_decay=0)
    state = train_shapes_video(second, config, init_from=first / "pipeline")
    assert (state["vae_step"], state["decoder_step"], state["denoiser_step"]) == (2, 2, 2)
    log = [json.loads(line) for line in (second / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("decoder", 0), ("decoder", 1)]
    assert log[0]["loss"] == pytest.approx(expected, rel=1e-4)
    tuned = DiffusionPipeline.from_pretrained(second / "pipeline", use_safetensors=True, torch_dtype=torch.float32)
    assert tuned.vae.config.latents_mean == source.vae.config.latents_mean
    assert tuned.vae.config.latents_std == source.vae.config.latents_std
    changed = set()
    for name, value in source.vae.state_dict().items():
        if not torch.equal(tuned.vae.state_dict()[name], value):
            changed.add(name.split(".")[0])
    assert changed == {"decoder", "post_quant_conv"} or changed == {"decoder"}
    for part in ("transformer", "text_encoder"):
        for name, value in getattr(source, part).state_dict().items():
            assert torch.equal(getattr(tuned, part).state_dict()[name], value), (part, name)
    assert json.loads((second / "pipeline" / "training_state.json").read_text())["decoder_step"] == 2
    # resumes its counter; the CLI passes the flags through
    assert (
        train_shapes_video(second, _config(denoiser_steps=2, decoder_steps=3, decoder_frames=9))["decoder_step"] == 3
    )
    assert main(["train-shapes-video", "--out", str(tmp_path / "cli"), "--init-from", str(first / "pipeline"),
                 "--decoder-steps", "1", "--decoder-frames", "9", "--denoiser-steps", "2", "--vae-steps", "2",
                 "--vae-batch-size", "1", "--device", "cpu"]) == 0  # fmt: skip
    assert "decoder step 1, denoiser step 2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="decoder_frames=8 is not allowed: expected 4k \\+ 1 frames"):
        _config(decoder_frames=8)
    with pytest.raises(ValueError, match="decoder_lr=0 is not allowed"):
        _config(decoder_lr=0)


def test_init_decoder_from_joins_a_decoder_to_the_transformer_it_was_trained_beside(tmp_path, capsys):
    """--init-decoder-from: init_from's transformer, text encoder and encoder with another folder's decoder (and its
    decoder step), taken only when that folder's encoder and latent calibration are init_from's."""
    import shutil

    from diffusers import DiffusionPipeline

    from diffattn.cli import main

    def load(folder):
        return DiffusionPipeline.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32)

    first = tmp_path / "first"
    train_shapes_video(first, _config())
    tuned = tmp_path / "tuned"  # the decoder trained on from first's: same encoder and calibration
    train_shapes_video(tuned, _config(decoder_steps=2, decoder_frames=9, ema_decay=0), init_from=first / "pipeline")
    joined = tmp_path / "joined"
    state = train_shapes_video(joined, _config(), init_from=first / "pipeline", init_decoder_from=tuned / "pipeline")
    assert (state["vae_step"], state["decoder_step"], state["denoiser_step"]) == (2, 2, 2)
    source, decoder, result = load(first / "pipeline"), load(tuned / "pipeline"), load(joined / "pipeline")
    differs = 0
    for name, value in result.vae.state_dict().items():
        part = name.split(".")[0]
        expected = (decoder if part in ("decoder", "post_quant_conv") else source).vae.state_dict()[name]
        assert torch.equal(value, expected), name
        differs += not torch.equal(decoder.vae.state_dict()[name], source.vae.state_dict()[name])
    assert differs > 0  # the two decoders differ, so the equalities above say which one was taken
    for part in ("transformer", "text_encoder"):
        for name, value in getattr(source, part).state_dict().items():
            assert torch.equal(getattr(result, part).state_dict()[name], value), (part, name)
    assert json.loads((joined / "pipeline" / "training_state.json").read_text())["decoder_step"] == 2

    other = tmp_path / "other"  # another seed: another encoder
    train_shapes_video(other, _config(seed=1))
    with pytest.raises(ValueError, match="init_decoder_from=.* is not allowed: its encoder differs"):
        train_shapes_video(
            tmp_path / "x", _config(), init_from=first / "pipeline", init_decoder_from=other / "pipeline"
        )
    shifted = tmp_path / "shifted"
    shutil.copytree(tuned / "pipeline", shifted)
    vae_config = json.loads((shifted / "vae" / "config.json").read_text())
    vae_config["latents_std"] = [v * 2 for v in vae_config["latents_std"]]
    (shifted / "vae" / "config.json").write_text(json.dumps(vae_config))
    with pytest.raises(ValueError, match="init_decoder_from=.* is not allowed: its latents_std differs"):
        train_shapes_video(tmp_path / "y", _config(), init_from=first / "pipeline", init_decoder_from=shifted)
    with pytest.raises(ValueError, match="init_decoder_from is not allowed without init_from"):
        train_shapes_video(tmp_path / "z", _config(), init_decoder_from=tuned / "pipeline")
    assert main(["train-shapes-video", "--out", str(tmp_path / "c"), "--init-decoder-from", str(tuned)]) == 2
    assert "--init-decoder-from is not allowed without --init-from" in capsys.readouterr().err
