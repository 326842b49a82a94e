"""LoRA fine-tuning with radial attention: gradients through the sparse kernel, loss goes down, adapters reload."""

import numpy as np
import pytest
import torch

import diffattn
import diffattn.methods.radial_attention as radial
from diffattn.cli import main
from diffattn.training import WEIGHTS_NAME, add_lora, flow_matching_loss, flow_matching_noise, train_radial_lora

from helpers import load


SPARSE = diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=64)


def _batch(pipe):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 9, 16, 16, generator=g)  # 9 latent frames of 8x8 tokens: a sparse radial mask
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("a red boat", do_classifier_free_guidance=False, max_sequence_length=16)
    return latents, embeds


def test_gradients_reach_lora_through_the_sparse_kernel(monkeypatch):
    pipe = load("tiny-wan")
    calls = []
    original = radial.radial_joint_attention

    def spy(*args, **kwargs):
        calls.append(args[3].density)
        return original(*args, **kwargs)

    monkeypatch.setattr(radial, "radial_joint_attention", spy)
    params = add_lora(pipe.transformer, rank=4)
    handle = diffattn.apply(pipe.transformer, SPARSE)
    latents, embeds = _batch(pipe)
    draws = flow_matching_noise(latents.shape, torch.Generator().manual_seed(1))
    loss = flow_matching_loss(pipe.transformer, latents, embeds, *draws)
    loss.backward()
    handle.remove()
    assert calls and all(d < 1.0 for d in calls)  # both self-attention layers ran sparse
    lora_b = [p for n, p in pipe.transformer.named_parameters() if "lora_B" in n and "attn1" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    frozen = [p for n, p in pipe.transformer.named_parameters() if "lora" not in n]
    assert all(p.grad is None for p in frozen) and len(params) == len(
        [n for n, _ in pipe.transformer.named_parameters() if "lora" in n]
    )


def test_the_loss_shifts_its_noise_levels_as_the_scheduler_shifts_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    seen = []

    class Recorder(torch.nn.Module):  # returns zeros; records the timesteps and the noisy latents it is given
        def forward(self, noisy, timestep, embeds, return_dict=False):
            seen.append((timestep / 1000.0, noisy))
            return (torch.zeros_like(noisy),)

    latents, embeds = torch.randn(4096, 1, 1, 1, 1), torch.zeros(4096, 1, 1)
    for shift in (1.0, 3.0):
        draws = flow_matching_noise(latents.shape, torch.Generator().manual_seed(7), shift)
        loss = flow_matching_loss(Recorder(), latents, embeds, *draws)
        sigma, noisy = seen[-1]
        noise = (noisy - (1 - sigma.view(-1, 1, 1, 1, 1)) * latents) / sigma.view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(loss, torch.mean((noise - latents) ** 2))  # the target is noise - latents
    unshifted, shifted = seen[0][0], seen[1][0]
    # the same draws, mapped by the scheduler's own sigma shift (set_timesteps with explicit sigmas applies it)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=unshifted[:16].tolist())
    torch.testing.assert_close(shifted[:16], scheduler.sigmas[:16].to(shifted.dtype))
    # logit-normal's median 0.5 moves to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert abs(unshifted.median().item() - 0.5) < 0.03 and abs(shifted.median().item() - 0.75) < 0.03
    noise, sigma = flow_matching_noise((4096, 1, 1, 1, 1), torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match=r"noise \(4096, 1, 1, 1, 1\) and sigma \(4095,\) do not fit latents"):
        flow_matching_loss(Recorder(), latents, embeds, noise, sigma[1:])


def test_a_weighted_loss_is_the_weighted_mean_of_the_squared_error():
    class Half(torch.nn.Module):  # predicts half the noisy latents
        def forward(self, noisy, timestep, embeds, return_dict=False):
            return (0.5 * noisy,)

    latents = torch.randn(2, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    noise, sigma = flow_matching_noise(latents.shape, torch.Generator().manual_seed(1))
    embeds = torch.zeros(2, 1, 1)
    s = sigma.view(-1, 1, 1, 1, 1)
    error = (0.5 * ((1 - s) * latents + s * noise) - (noise - latents)) ** 2  # [B, C, F, H, W]
    weight = torch.ones(2, 1, 2, 2, 2)
    weight[1, 0, 1, 0, 1] = 5.0  # one position of the second clip counts five times, in every channel
    expected = (error.sum() + 4 * error[1, :, 1, 0, 1].sum()) / (error.numel() + 4 * 3)
    torch.testing.assert_close(flow_matching_loss(Half(), latents, embeds, noise, sigma, weight), expected)
    plain = flow_matching_loss(Half(), latents, embeds, noise, sigma)
    torch.testing.assert_close(
        flow_matching_loss(Half(), latents, embeds, noise, sigma, torch.ones_like(weight)), plain
    )
    with pytest.raises(ValueError, match=r"weight \(2, 3, 2, 2, 2\) does not fit latents"):
        flow_matching_loss(Half(), latents, embeds, noise, sigma, torch.ones_like(latents))


def test_loss_on_a_fixed_batch_goes_down():
    pipe = load("tiny-wan")
    params = add_lora(pipe.transformer, rank=8)
    handle = diffattn.apply(pipe.transformer, SPARSE)
    latents, embeds = _batch(pipe)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(10):
        draws = flow_matching_noise(latents.shape, torch.Generator().manual_seed(1))  # the same noise each step
        loss = flow_matching_loss(pipe.transformer, latents, embeds, *draws)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    handle.remove()
    assert all(b < a for a, b in zip(losses, losses[1:4])), losses  # same batch and noise: steady descent
    assert losses[-1] < losses[0] * 0.97, losses


def test_train_lora_command_from_videos_saves_loadable_adapters(tmp_path, capsys):
    import imageio.v3 as iio

    data = tmp_path / "clips"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        iio.imwrite(data / f"clip{i}.mp4", (rng.random((33, 64, 64, 3)) * 255).astype(np.uint8), fps=8)
        (data / f"clip{i}.txt").write_text(f"a red boat number {i}")
    out = tmp_path / "lora"
    args = ["train-lora", "--data", str(data), "--out", str(out), "--steps", "3", "--rank", "4", "--lr", "1e-3",
            "--block-size", "64"]  # fmt: skip
    assert main(args) == 0
    assert "3 steps" in capsys.readouterr().out and (out / WEIGHTS_NAME).is_file()
    assert main(args) == 2  # never silently replaces adapters
    assert "already holds" in capsys.readouterr().err

    pipe = load("tiny-wan")
    base = pipe.transformer(torch.ones(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.ones(1, 8, 32)).sample
    pipe.load_lora_weights(out)
    with torch.no_grad():
        lora_b = [p for n, p in pipe.transformer.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (lora_B starts at zero)
    tuned = pipe.transformer(torch.ones(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.ones(1, 8, 32)).sample
    assert not torch.allclose(base, tuned)


def test_gradient_checkpointing_trains_the_same_adapters(tmp_path, monkeypatch):
    """train-lora with the blocks recomputed in the backward pass (diffusers' gradient checkpointing, radial
    attention running again inside the recomputation) gives the losses and adapters of the run that holds them."""
    from safetensors.torch import load_file, save_file

    data = tmp_path / "latents"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):  # cached latents: 9 latent frames of 8x8 tokens, a sparse radial mask
        save_file({"latents": torch.randn(16, 9, 16, 16, generator=g)}, str(data / f"clip{i}.safetensors"))
        (data / f"clip{i}.txt").write_text(f"a red boat number {i}")
    calls = []
    original = radial.radial_joint_attention
    monkeypatch.setattr(radial, "radial_joint_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    runs, sparse_calls = {}, {}
    for checkpointing in (False, True):
        calls.clear()
        pipe = load("tiny-wan")
        out = tmp_path / f"lora-{checkpointing}"
        summary = train_radial_lora("tiny-wan", data, out, steps=3, rank=4, learning_rate=1e-2, radial=SPARSE,
                                    gradient_checkpointing=checkpointing, pipe=pipe)  # fmt: skip
        assert not pipe.transformer.gradient_checkpointing  # switched off again after training
        runs[checkpointing] = (summary["losses"], load_file(str(out / WEIGHTS_NAME)))
        sparse_calls[checkpointing] = len(calls)
    assert sparse_calls[True] == 2 * sparse_calls[False] > 0  # each block's attention ran again in the backward
    (plain_losses, plain), (recomputed_losses, recomputed) = runs[False], runs[True]
    assert plain_losses[-1] != plain_losses[0]  # the adapters moved, so the later losses compare trained weights
    torch.testing.assert_close(recomputed_losses, plain_losses, rtol=1e-5, atol=1e-6)
    assert recomputed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_train_lora_takes_the_models_radial_settings_and_refuses_them_with_dense(tmp_path, monkeypatch, capsys):
    """train-lora trains with the mask the model generates with (shapes-wan's 16-token blocks and decay 0.25, not the
    library's 128 and 1.0), sparse on every layer; a radial flag beside --dense is refused, not dropped."""
    import diffattn.training as training
    from diffattn.methods.radial_attention import RadialAttentionConfig
    from diffattn.presets import PRESETS

    received = []
    monkeypatch.setattr(training, "train_radial_lora", lambda *a, **k: received.append(k) or {"losses": [1.0]})
    base = ["train-lora", "--data", str(tmp_path), "--out", str(tmp_path / "lora"), "--steps", "1"]
    assert main([*base, "-m", "shapes-wan"]) == 0
    shipped = PRESETS["shapes-wan"].radial
    assert received[-1]["radial"] == RadialAttentionConfig(
        dense_layers=0, dense_timesteps=0, dense_last_timesteps=0, decay_factor=shipped.decay_factor,
        block_size=shipped.block_size, sink_frames=shipped.sink_frames,
        dense_neighbor_frames=shipped.dense_neighbor_frames,
    )  # fmt: skip
    assert received[-1]["radial"].block_size == 16 and received[-1]["radial"].decay_factor == 0.25
    assert main([*base, "-m", "shapes-wan", "--block-size", "32", "--dense-layers", "1"]) == 0
    assert (received[-1]["radial"].block_size, received[-1]["radial"].dense_layers) == (32, 1)
    assert main([*base, "-m", "tiny-wan"]) == 0  # no preset settings: the library's
    assert received[-1]["radial"] == RadialAttentionConfig(dense_layers=0, dense_timesteps=0)
    assert main([*base, "--dense"]) == 0 and received[-1]["radial"] is None and received[-1]["dense"]
    capsys.readouterr()
    calls = len(received)
    assert main([*base, "--dense", "--decay-factor", "0.5"]) == 2
    assert "radial options ['decay_factor'] are not allowed with --dense" in capsys.readouterr().err
    assert len(received) == calls  # refused before any training


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        train_radial_lora("tiny-wan", tmp_path / "missing", tmp_path / "out", steps=1)
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="clip.mp4 has no caption file clip.txt"):
        train_radial_lora("tiny-wan", tmp_path, tmp_path / "out", steps=1)
    with pytest.raises(ValueError, match="train-lora supports the Wan family"):
        train_radial_lora("tiny-sd", tmp_path, tmp_path / "out", steps=1)
