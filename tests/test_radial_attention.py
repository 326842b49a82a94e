"""Radial attention: the mask against the published rule and table, the processors against plain masked attention."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

import diffattn
import diffattn.methods.radial_attention as radial
from diffattn.methods.radial_mask import radial_density

from helpers import load, run


# ---- the mask ---------------------------------------------------------------------------------------------------


def brute_force_radial_mask(f, s, block, decay, sink, dense_neighbors=1):
    """The published rule at token level, one frame pair at a time, shrunk by counting (test-only derivation)."""
    p = 2 ** s.bit_length()
    nb = math.ceil(f * s / block)
    n = f * s
    out = torch.zeros(nb, nb, dtype=torch.bool)
    idx = torch.arange(s)
    for i in range(f):
        for j in range(f):
            d = abs(i - j)
            if j < sink or d == 0 or d <= dense_neighbors:
                tokens = torch.ones(s, s, dtype=torch.bool)
            else:
                u = p / 2 ** d.bit_length()
                if u < 128 and d % int(128 / u) != 0:
                    continue
                tokens = (idx[:, None] - idx[None, :]).abs() <= max(block, decay * u)
            ro, co = (i * s) % block, (j * s) % block
            rows, cols = math.ceil((ro + s) / block), math.ceil((co + s) / block)
            canvas = torch.zeros(rows * block, cols * block)
            canvas[ro : ro + s, co : co + s] = tokens.float()
            r0, c0 = (i * s) // block, (j * s) // block
            # rows each canvas row tile really has in the sequence (only the tail block is short)
            real_rows = torch.tensor([min(block, n - (r0 + r) * block) for r in range(rows)]).float()
            col_density = canvas.view(rows, block, cols, block).sum(1) / real_rows[:, None, None]
            non_zero = (col_density > 0).sum(-1)
            high = (col_density > 1 / 3).sum(-1)
            keep = high / (non_zero + 1e-9) > 0.6
            r1, c1 = min(r0 + rows, nb), min(c0 + cols, nb)
            out[r0:r1, c0:c1] |= keep[: r1 - r0, : c1 - c0]
    return out


@pytest.mark.parametrize(
    "frames, per_frame, block, decay, sink",
    [
        (7, 100, 64, 1.0, 1),
        (12, 200, 128, 0.5, 0),
        (9, 60, 64, 0.3, 1),
        (20, 130, 128, 1.0, 2),
        (5, 1000, 64, 0.2, 0),
        (7, 240, 64, 1.0, 1),
    ],  # fmt: skip
)
def test_mask_matches_token_level_derivation(frames, per_frame, block, decay, sink):
    mask = diffattn.radial_block_mask(frames, per_frame, block_size=block, decay_factor=decay, sink_frames=sink)
    expected = brute_force_radial_mask(frames, per_frame, block, decay, sink)
    assert mask.shape == (math.ceil(frames * per_frame / block),) * 2 and mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert mask.any(-1).all()  # every query block, the partial last one included, keeps a key block


@pytest.mark.parametrize(
    "frames, per_frame, block, decay, sink, dense_neighbors",
    [(12, 256, 64, 1.0, 1, 0), (9, 256, 32, 0.5, 1, 0), (10, 300, 64, 0.2, 0, 0), (8, 520, 128, 1.0, 1, 2)],
)
def test_dense_neighbor_frames_matches_token_level_derivation(frames, per_frame, block, decay, sink, dense_neighbors):
    mask = diffattn.radial_block_mask(frames, per_frame, block_size=block, decay_factor=decay, sink_frames=sink,
                                      dense_neighbor_frames=dense_neighbors)  # fmt: skip
    expected = brute_force_radial_mask(frames, per_frame, block, decay, sink, dense_neighbors)
    assert torch.equal(mask, expected)
    upstream = diffattn.radial_block_mask(frames, per_frame, block_size=block, decay_factor=decay, sink_frames=sink)
    if dense_neighbors == 0:
        assert radial_density(mask) <= radial_density(upstream)
        # sparser than upstream's floor wherever the first neighbour's band is narrower than a frame
        narrower = max(block, decay * 2 ** per_frame.bit_length() / 2) < per_frame
        assert (radial_density(mask) < radial_density(upstream)) == narrower
    with pytest.raises(ValueError, match="dense_neighbor_frames=-1 is not allowed"):
        diffattn.RadialAttentionConfig(dense_neighbor_frames=-1)


# reference notes §1.4: (frames, tokens per frame, sink, density at lambda=1, lambda, density at lambda)
DENSITY_TABLE = [
    (21, 1560, 1, 44.5, 0.2, 33.9),  # Wan2.1 480p 81f
    (21, 3600, 1, 39.6, 0.2, 26.2),  # Wan2.1 720p 81f
    (18, 3840, 1, 43.1, 0.2, 28.7),  # Wan 768x1280 69f
    (41, 3600, 1, 26.0, 0.2, 17.6),  # Wan 720p 161f
    (30, 3840, 0, 29.3, 0.95, 27.5),  # Hunyuan 768x1280 117f
    (64, 3600, 0, 17.8, 0.95, 17.5),  # Hunyuan 720p 253f
    (128, 3600, 0, 10.9, 0.95, 10.7),  # Hunyuan 720p 509f
]


@pytest.mark.parametrize("frames, per_frame, sink, dense_1, decay, dense_decay", DENSITY_TABLE)
def test_densities_match_reference_table(frames, per_frame, sink, dense_1, decay, dense_decay):
    full = diffattn.radial_block_mask(frames, per_frame, sink_frames=sink)
    decayed = diffattn.radial_block_mask(frames, per_frame, sink_frames=sink, decay_factor=decay)
    assert 100 * radial_density(full) == pytest.approx(dense_1, abs=1.5)
    assert 100 * radial_density(decayed) == pytest.approx(dense_decay, abs=1.5)


def test_mask_for_115k_tokens_builds_in_under_a_second():
    from diffattn.methods import radial_mask

    radial_mask._shrunk_pair.cache_clear()
    start = time.perf_counter()
    mask = diffattn.radial_block_mask(30, 3840, sink_frames=0, decay_factor=0.95)
    assert time.perf_counter() - start < 1.0
    assert mask.shape == (900, 900)
    assert mask.any(-1).all()  # every query block keeps a key block


def test_mask_validation_and_plot(tmp_path):
    with pytest.raises(ValueError, match="num_frames=0 is not allowed"):
        diffattn.radial_block_mask(0, 10)
    with pytest.raises(ValueError, match="block_size=48 is not allowed: expected one of 16, 32, 64, 128"):
        diffattn.radial_block_mask(3, 10, block_size=48)
    with pytest.raises(ValueError, match="decay_factor=0 is not allowed"):
        diffattn.radial_block_mask(3, 10, decay_factor=0)
    mask = diffattn.radial_block_mask(12, 256, block_size=64)
    image = diffattn.plot_radial_mask(mask, tmp_path / "mask.png", tokens_per_frame=256, block_size=64)
    assert (tmp_path / "mask.png").is_file() and image.size[0] == image.size[1] >= mask.shape[0]
    pixels = torch.tensor(list(image.convert("L").getdata())).view(image.size[1], image.size[0])
    scale = image.size[0] // mask.shape[0]
    assert pixels[scale // 2, scale // 2] > 200  # block (0, 0) is computed: bright
    hole = (~mask).nonzero()[0]
    assert pixels[hole[0] * scale + scale // 2, hole[1] * scale + scale // 2] < 60  # skipped: dark


def test_config_validation():
    with pytest.raises(ValueError, match="dense_layers=-1 is not allowed"):
        diffattn.RadialAttentionConfig(dense_layers=-1)
    with pytest.raises(ValueError, match="block_size=256 is not allowed"):
        diffattn.RadialAttentionConfig(block_size=256)
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        diffattn.RadialAttentionConfig(backend="cuda")
    with pytest.raises(ValueError, match="decay_factor=-0.5 is not allowed"):
        diffattn.RadialAttentionConfig(decay_factor=-0.5)
    with pytest.raises(ValueError, match="sink_frames=-1 is not allowed"):
        diffattn.RadialAttentionConfig(sink_frames=-1)


def test_unsupported_family_and_too_many_dense_layers():
    with pytest.raises(ValueError, match="does not support the stable-diffusion-unet family.*wan"):
        diffattn.apply(load("tiny-sd"), diffattn.RadialAttentionConfig())
    wan = load("tiny-wan")
    with pytest.raises(ValueError, match="dense_layers=5 is not allowed: this WanTransformer3DModel has 2"):
        diffattn.apply(wan, diffattn.RadialAttentionConfig(dense_layers=5))
    assert not wan.transformer._forward_pre_hooks


# ---- processors against plain masked attention ------------------------------------------------------------------

VIDEO = {"num_frames": 33, "height": 96, "width": 160}  # 9 latent frames of 6x10 tokens: 540, not a block multiple


def _token_mask(frames, per_frame, block, sink):
    mask = diffattn.radial_block_mask(frames, per_frame, block_size=block, sink_frames=sink)
    n = frames * per_frame
    return mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]


def _spy(monkeypatch, name):
    calls = []
    original = getattr(radial, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(radial, name, spy)
    return calls


# family preset -> (sink frames by default, extra call arguments, expected sparse calls per step, text padding)
FAMILIES = {
    "tiny-wan": (1, {}, 2 * 2, False),  # 2 layers x (cond, uncond): Wan runs CFG as two calls
    "tiny-hunyuan-video": (0, {"prompt_template": {"template": "{}", "crop_start": 0}}, 2, True),
    "tiny-cogvideox": (1, {}, 2, False),  # CFG in one batch
    "tiny-ltx-video": (1, {}, 2, False),
    "tiny-mochi": (1, {}, 2, True),
}
GEOMETRY = {
    # frames, height, width of the call -> (latent frames, tokens per frame); none are multiples of the block
    "tiny-wan": ({"num_frames": 33, "height": 96, "width": 160}, (9, 60)),
    "tiny-hunyuan-video": ({"num_frames": 33, "height": 96, "width": 160}, (9, 60)),
    "tiny-cogvideox": ({"num_frames": 33, "height": 96, "width": 160}, (9, 60)),
    "tiny-ltx-video": ({"num_frames": 49, "height": 96, "width": 160}, (7, 240)),  # 8x temporal VAE, patch 1
    "tiny-mochi": ({"num_frames": 31, "height": 96, "width": 160}, (6, 60)),  # 6x temporal VAE
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sparse_attention_equals_plain_masked_attention(monkeypatch, name):
    """The radial layer output equals dense SDPA with the expanded block mask (and text rules), computed here."""
    _check_layers_against_masked_sdpa(monkeypatch, name, "cpu", "auto", block=64)


@pytest.mark.parametrize("block", [16, 32])
def test_small_blocks_are_exact_too(monkeypatch, block):
    """Blocks of 16 and 32 tokens (shapes-wan's frames are 256 tokens): the same check on Wan."""
    _check_layers_against_masked_sdpa(monkeypatch, "tiny-wan", "cpu", "auto", block=block)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FAMILIES))
def test_gpu_triton_radial_layers_equal_plain_masked_attention(monkeypatch, name):
    """The same check with the pipeline on CUDA and the real (compiled) Triton kernel behind every layer."""
    _check_layers_against_masked_sdpa(monkeypatch, name, "cuda", "triton", block=64)


def _check_layers_against_masked_sdpa(monkeypatch, name, device, backend, block):
    sink, extra, calls_per_step, padded = FAMILIES[name]
    call, (frames, per_frame) = GEOMETRY[name]
    pipe = load(name).to(device)
    calls = _spy(monkeypatch, "radial_joint_attention")
    config = diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=block, backend=backend)
    handle = diffattn.apply(pipe, config)
    prompts = ["a boat on the sea at sunset", "a dog", "a cat"]  # batch 3, prompts of different lengths
    run(pipe, name, steps=2, prompt=prompts, **call, **extra)
    handle.remove()
    assert len(calls) == 2 * calls_per_step
    num_video = frames * per_frame
    video_keep = _token_mask(frames, per_frame, block, sink)
    assert 0.1 < video_keep.float().mean() < 0.95  # really sparse
    saw_padding = False
    for (q, k, v, layout, video, key_mask, _), _, out in calls:
        q, k, v, out = (t.cpu() for t in (q, k, v, out))
        key_mask = None if key_mask is None else key_mask.cpu()
        b, n = q.shape[:2]
        assert b % 3 == 0 and video.stop - video.start == num_video
        keep = torch.ones(b, n, n, dtype=torch.bool)
        if key_mask is not None:
            keep &= key_mask[:, None, :]  # padded text keys are never attended
            saw_padding |= not bool(key_mask.all())
        keep[:, video, video] &= video_keep  # video-video restricted to the radial mask; text rows and cols dense
        expected = F.scaled_dot_product_attention(
            q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(), attn_mask=keep[:, None]
        ).transpose(1, 2)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert saw_padding == padded


@pytest.mark.parametrize("name", list(FAMILIES))
def test_all_ones_mask_reproduces_dense_pipeline(name):
    pipe = load(name)
    frames = {"tiny-mochi": 7, "tiny-ltx-video": 9}.get(name, 5)  # 2 latent frames: all blocks computed
    geometry = {"num_frames": frames, "height": 128, "width": 128}
    dense = run(pipe, name, steps=2, **geometry)
    handle = diffattn.apply(pipe, diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=64))
    sparse = run(pipe, name, steps=2, **geometry)
    layout = next(iter(handle.methods[0].cache.layouts.values()))
    handle.remove()
    assert layout.density == 1.0
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_dense_steps_and_layers_run_the_original_path(name):
    pipe = load(name)
    VIDEO = GEOMETRY[name][0]
    dense = run(pipe, name, steps=3, **VIDEO)
    all_dense = diffattn.apply(pipe, diffattn.RadialAttentionConfig(dense_timesteps=3, block_size=64))
    assert torch.equal(run(pipe, name, steps=3, **VIDEO), dense)  # every step dense: exactly the dense output
    all_dense.remove()
    originals = dict(diffattn.adapters.attention_processors(pipe.transformer))
    layers = diffattn.adapters.adapter_for(pipe.transformer).attention_layers()
    video_keys = [layer.key for layer in layers if layer.kind in ("self", "joint")]
    handle = diffattn.apply(pipe, diffattn.RadialAttentionConfig(dense_layers=1, dense_timesteps=1, block_size=64))
    installed = handle._installed[id(pipe.transformer)]
    assert video_keys[0] not in installed  # the first video attention layer keeps its own processor object
    assert diffattn.adapters.attention_processors(pipe.transformer)[video_keys[0]] is originals[video_keys[0]]
    assert set(installed) == set(video_keys[1:])
    sparse = run(pipe, name, steps=3, **VIDEO)
    handle.remove()
    assert not torch.allclose(sparse, dense, atol=1e-4)  # sparse steps change the result
    assert torch.equal(run(pipe, name, steps=3, **VIDEO), dense)  # remove: bit-identical


def test_schedule_counts_first_and_last_dense_steps(monkeypatch):
    pipe = load("tiny-wan")
    calls = _spy(monkeypatch, "radial_joint_attention")
    steps_seen = []
    handle = diffattn.apply(
        pipe, diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=1, dense_last_timesteps=2, block_size=64)
    )
    original = radial._RadialSchedule.sparse_now

    def record(self):
        result = original(self)
        steps_seen.append((self.state.step_index, result))
        return result

    monkeypatch.setattr(radial._RadialSchedule, "sparse_now", record)
    run(pipe, "tiny-wan", steps=5, **VIDEO)
    handle.remove()
    sparse_steps = sorted({s for s, sparse in steps_seen if sparse})
    assert sparse_steps == [1, 2]
    assert len(calls) == 2 * 2 * 2  # 2 sparse steps x 2 layers x (cond, uncond)


def test_mask_cache_follows_geometry_and_device():
    pipe = load("tiny-wan")
    handle = diffattn.apply(pipe, diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=64))
    run(pipe, "tiny-wan", steps=1, **VIDEO)
    run(pipe, "tiny-wan", steps=1, num_frames=17, height=128, width=128)
    run(pipe, "tiny-wan", steps=1, **VIDEO)
    layouts = handle.methods[0].cache.layouts
    handle.remove()
    assert list(layouts) == [(5, 64, "cpu"), (9, 60, "cpu")]  # least recently used first
    assert torch.equal(layouts[(5, 64, "cpu")].block_mask[0], diffattn.radial_block_mask(5, 64, block_size=64))
    assert torch.equal(layouts[(9, 60, "cpu")].block_mask[0], diffattn.radial_block_mask(9, 60, block_size=64))


def _wan22_pipeline():
    """tiny-wan as Wan 2.2: a second transformer (a copy) takes over at half the schedule."""
    import copy

    from diffusers import WanPipeline

    base = load("tiny-wan")
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer,
                       transformer_2=copy.deepcopy(base.transformer), boundary_ratio=0.5)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_wan22_two_transformers_share_one_schedule(monkeypatch):
    """Wan 2.2 switches from `transformer` to `transformer_2` mid-schedule: both get radial attention, one state."""
    pipe = _wan22_pipeline()
    second = pipe.transformer_2
    dense = run(pipe, "tiny-wan", steps=4, **GEOMETRY["tiny-wan"][0])
    seen = []
    original = radial._Scheduled._dispatch

    def record(self, attn, *args, **kwargs):
        owner = "transformer_2" if any(attn is m for m in second.modules()) else "transformer"
        seen.append((owner, self.schedule.state.step_index, self.schedule.sparse_now()))
        return original(self, attn, *args, **kwargs)

    monkeypatch.setattr(radial._Scheduled, "_dispatch", record)
    handle = diffattn.apply(pipe, diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=1, block_size=64))
    assert set(handle._installed) == {id(pipe.transformer), id(second)}
    sparse = run(pipe, "tiny-wan", steps=4, **GEOMETRY["tiny-wan"][0])
    method = handle.method(diffattn.RadialAttentionConfig)
    assert set(method.caches) == {"transformer", "transformer_2"}  # one mask cache per denoiser, neither replaced
    for name in ("transformer", "transformer_2"):
        assert method.caches[name].layouts, name  # each built the mask of the steps it ran sparse
    handle.remove()
    by_owner = {
        owner: sorted({step for o, step, _ in seen if o == owner}) for owner in ("transformer", "transformer_2")
    }
    high_noise = [i for i, t in enumerate(pipe.scheduler.timesteps) if t >= 0.5 * 1000]  # WanPipeline's switch rule
    assert 0 < len(high_noise) < 4
    low_noise = [i for i in range(4) if i not in high_noise]
    assert by_owner == {"transformer": high_noise, "transformer_2": low_noise}  # one step count across both
    assert {(step, is_sparse) for _, step, is_sparse in seen} == {(0, False), (1, True), (2, True), (3, True)}
    assert not torch.allclose(sparse, dense, atol=1e-4)
    assert torch.equal(run(pipe, "tiny-wan", steps=4, **GEOMETRY["tiny-wan"][0]), dense)


def test_wan22_second_transformer_with_a_replaced_processor_stops_the_run():
    """The check that a handle's processors are still in place runs at each denoiser's first call of a run, so
    Wan 2.2's `transformer_2`, first called mid-schedule, is checked too."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    pipe = _wan22_pipeline()
    handle = diffattn.apply(pipe, diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=1, block_size=64))
    run(pipe, "tiny-wan", steps=4, **GEOMETRY["tiny-wan"][0])  # in place: runs
    key = next(k for k in pipe.transformer_2.attn_processors if k.endswith("attn1.processor"))
    pipe.transformer_2.set_attn_processor({**pipe.transformer_2.attn_processors, key: WanAttnProcessor()})
    with pytest.raises(RuntimeError, match=r"1 of the 2 attention layers .* on WanTransformer3DModel hold another"):
        run(pipe, "tiny-wan", steps=4, **GEOMETRY["tiny-wan"][0])
    handle.remove()


def test_wan_i2v_image_tokens_keep_their_dense_cross_attention(monkeypatch):
    """Wan I2V: attn2 carries the image tokens (added k/v); radial replaces only attn1 and the model still runs."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=24, added_kv_proj_dim=32, rope_max_seq_len=64,
    )  # fmt: skip
    originals = dict(model.attn_processors)
    latents = torch.randn(1, 16, 9, 16, 16)  # 9 frames of 8x8 tokens
    text, image = torch.randn(1, 512, 32), torch.randn(1, 257, 24)  # Wan assumes 512 text tokens before the image
    calls = _spy(monkeypatch, "radial_joint_attention")
    dense = model(latents, torch.tensor([500.0]), text, encoder_hidden_states_image=image).sample
    handle = diffattn.apply(model, diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=64))
    assert set(handle._installed[id(model)]) == {k for k in originals if "attn1" in k}
    assert all(model.attn_processors[k] is v for k, v in originals.items() if "attn2" in k)
    sparse = model(latents, torch.tensor([500.0]), text, encoder_hidden_states_image=image).sample
    handle.remove()
    assert len(calls) == 2 and calls[0][0][3].density < 1.0
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense, atol=1e-5)


def test_wan_vace_control_blocks_get_radial_attention_too(monkeypatch):
    """Wan VACE: the control branch's `vace_blocks` attend over the same video tokens; each of their attn1 and the
    main blocks' attn1 equals SDPA under the expanded block mask, and remove gives the model back bit-identical."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, rope_max_seq_len=64, vace_layers=[0, 2],
        vace_in_channels=24,
    )  # fmt: skip
    originals = dict(model.attn_processors)
    latents, control = torch.randn(1, 16, 9, 12, 8), torch.randn(1, 24, 9, 12, 8)  # 9 frames of 6x4 tokens
    args = (latents, torch.tensor([500.0]), torch.randn(1, 16, 32))
    dense = model(*args, control_hidden_states=control).sample
    calls = _spy(monkeypatch, "radial_joint_attention")
    handle = diffattn.apply(model, diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=16))
    assert set(handle._installed[id(model)]) == {k for k in originals if k.endswith("attn1.processor")}
    assert {k.split(".")[0] for k in handle._installed[id(model)]} == {"blocks", "vace_blocks"}
    sparse = model(*args, control_hidden_states=control).sample
    handle.remove()
    assert len(calls) == 3 + 2  # every main block and every control block
    keep = _token_mask(9, 24, 16, sink=1)
    assert 0.1 < keep.float().mean() < 0.95
    for (q, k, v, *_), _, out in calls:
        expected = F.scaled_dot_product_attention(
            q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(), attn_mask=keep
        ).transpose(1, 2)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sparse, dense, atol=1e-5)
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(model(*args, control_hidden_states=control).sample, dense)
