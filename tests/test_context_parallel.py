"""Radial attention under diffusers' context parallelism (Ulysses), in real processes: torchrun, gloo, CPU."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffattn.adapters.ulysses import ulysses_group

from helpers import torchrun


WORKER = Path(__file__).parent / "cp_radial_worker.py"


CASES = [
    ("apply-first", ["33", "128", "128", "tiny-wan"], 2),
    # parallel first; 4 processes: shapes-wan's 4 heads, one a process; 17 frames: 1,280 tokens, 320 a process
    ("parallel-first", ["17", "64", "64", "shapes-wan"], 4),
    # joint attention ([video | text], text padding masked): diffattn's plan, the text whole on every rank
    ("diffattn-plan", ["33", "128", "128", "tiny-hunyuan-video"], 2),
    # text first ([text | video]), no text mask
    ("diffattn-plan", ["33", "128", "128", "tiny-cogvideox"], 2),
    # [video | valid text], padded text outputs zero; 6 latent frames (Mochi: 6x in time)
    ("diffattn-plan", ["31", "128", "128", "tiny-mochi"], 2),
    # diffusers' own LTX plan, its text-masked cross-attention run by diffattn's Ulysses processor
    ("diffattn-plan", ["33", "128", "128", "tiny-ltx-video"], 2),
    # apply first: diffattn's processors go beneath radial's (its dense path; what remove() restores)
    ("apply-then-plan", ["33", "128", "128", "tiny-cogvideox"], 2),
]


def _case(order: str, geometry: list[str]) -> str:
    return ":".join([order, *geometry])


@pytest.fixture(scope="module")
def ulysses_reports():
    """Every case with the same process count runs in one torchrun launch (the processes start once); its reports
    by case, or the launch's failure."""
    launches = {}

    def launch(processes: int) -> subprocess.CompletedProcess:
        cases = [_case(o, g) for o, g, n in CASES if n == processes]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [*torchrun(processes), str(WORKER), *cases]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)

    def reports_of(order: str, geometry: list[str], processes: int) -> list[dict]:
        if processes not in launches:
            proc = launch(processes)
            if _a_rank_was_killed(proc):  # gloo has aborted a rank on this machine once (SIGABRT): one more launch
                warnings.warn(f"a {processes}-process launch lost a rank, launched again:\n{_failure(proc)}")
                proc = launch(processes)
            launches[processes] = proc
        proc = launches[processes]
        assert proc.returncode == 0, _failure(proc)
        # each report is read where it starts, whatever another process wrote after it on the same line
        reports = [json.JSONDecoder().raw_decode(chunk)[0] for chunk in proc.stdout.split("REPORT ")[1:]]
        return [r for r in reports if r["case"] == _case(order, geometry)]

    return reports_of


def _a_rank_was_killed(proc: subprocess.CompletedProcess) -> bool:
    """torchrun reports a rank that died by a signal as `exitcode: -N`; a wrong result exits 1 (an assertion)."""
    return proc.returncode != 0 and "(exitcode: -" in proc.stderr


def _failure(proc: subprocess.CompletedProcess) -> str:
    """Every rank's error lines (torchrun's own traceback buries them), then the end of the output."""
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "Error" in line or "exitcode" in line or "terminate" in line]
    return "\n".join(errors[-30:]) + "\n---\n" + output[-1500:]


@pytest.mark.parametrize("order, geometry, processes", CASES)
def test_radial_under_ulysses_equals_the_single_process_run(order, geometry, processes, ulysses_reports):
    reports = ulysses_reports(order, geometry, processes)
    assert sorted(r["rank"] for r in reports) == list(range(processes))
    for report in reports:
        # batch 2 with CFG, 3 steps (step 0 dense, 1-2 sparse): every rank's denoised latents equal one process's
        # radial run's (differences relative to the latents' largest value: float32 rounding, ~1e-7 here)
        assert report["radial_vs_single"] <= 2e-6
        assert report["radial_vs_dense"] > 1e-4  # the sparse steps really ran sparse (6e-4 to 0.14 here)
        assert report["layouts"] == 1  # the mask was built once per rank, over the whole sequence
        assert report["tokens_parallel"] * processes == report["tokens_single"]  # each rank held its shard
        assert (
            report["restored"] and report["dense_after_remove"] <= 2e-6
        )  # remove leaves the parallel model as it was
        if order in ("diffattn-plan", "apply-then-plan"):  # diffattn's Ulysses processor, kept after remove
            family = {"tiny-hunyuan-video": "HunyuanVideo", "tiny-cogvideox": "CogVideoX", "tiny-mochi": "Mochi",
                      "tiny-ltx-video": "LTXCrossAttn"}  # fmt: skip
            assert f"Ulysses{family[geometry[3]]}Processor" in report["processors"]


def test_a_model_without_any_plan_is_refused_clearly():
    import diffattn
    from diffattn.parallel import enable_context_parallel

    with pytest.raises(ValueError, match="StableDiffusionPipeline has no transformer with a context-parallel plan"):
        enable_context_parallel(diffattn.load_pipeline("tiny-sd"), 2)


@pytest.mark.parametrize(
    "name, model, ulysses",
    [("tiny-hunyuan-video", "HunyuanVideoTransformer3DModel", "UlyssesHunyuanVideoProcessor"),
     ("tiny-cogvideox", "CogVideoXTransformer3DModel", "UlyssesCogVideoXProcessor"),
     ("tiny-mochi", "MochiTransformer3DModel", "UlyssesMochiProcessor"),
     ("tiny-ltx-video", "LTXVideoTransformer3DModel", "UlyssesLTXCrossAttnProcessor")],
)  # fmt: skip
def test_diffattn_processors_go_beneath_an_applied_method_and_are_ulysses_only(name, model, ulysses):
    """enable_context_parallel after apply: on a layer radial controls, the Ulysses processor becomes radial's dense
    path and what remove() restores; other layers get it directly (what the 2-process run checks end to end)."""
    import diffattn
    from diffattn.adapters import adapter_for, attention_processors
    from diffattn.parallel import _install_own_processors, enable_context_parallel

    pipe = diffattn.load_pipeline(name)
    with pytest.raises(ValueError, match=f"ring=True is not allowed for {model}"):
        enable_context_parallel(pipe, 2, ring=True)
    handle = diffattn.apply(pipe, diffattn.RadialAttentionConfig(dense_layers=1))
    radial = {k: p for k, p in attention_processors(pipe.transformer).items() if type(p).__name__.startswith("Radial")}
    beneath = {k: p.original for k, p in radial.items()}
    adapter = adapter_for(pipe.transformer)
    kinds = adapter.context_parallel_support()[1]
    targets = {layer.key for layer in adapter.attention_layers() if layer.kind in kinds}  # LTX: attn2, not radial's
    # what enable_context_parallel does before diffusers' part
    _install_own_processors(pipe.transformer, adapter, adapter.context_parallel_support(), ring=False)
    current = attention_processors(pipe.transformer)
    for key, processor in radial.items():
        assert current[key] is processor
        if key in targets:
            assert type(processor.original).__name__ == ulysses
        else:
            assert processor.original is beneath[key]
    handle.remove()
    after = attention_processors(pipe.transformer)
    assert not any(type(p).__name__.startswith("Radial") for p in after.values())
    assert targets and all(type(after[k]).__name__ == ulysses for k in targets)
    assert targets - set(radial)  # layers radial leaves alone got it directly too (dense_layers=1; LTX's attn2)


def test_a_method_without_a_fallback_keeps_context_parallelism_out():
    """A method whose processor has nothing beneath it cannot take the Ulysses processor: refused, nothing changed."""
    from dataclasses import dataclass

    import diffattn
    from diffattn.adapters import adapter_for, attention_processors
    from diffattn.control import AttentionMethod, MethodConfig
    from diffattn.parallel import _install_own_processors

    class Replace(AttentionMethod):
        def processors(self, adapter, layers, state):
            originals = attention_processors(adapter.model)
            return {layer.key: type(originals[layer.key])() for layer in layers if layer.kind == "joint"}

    @dataclass(frozen=True)
    class ReplaceConfig(MethodConfig):
        method_class = Replace

    pipe = diffattn.load_pipeline("tiny-cogvideox")
    handle = diffattn.apply(pipe, ReplaceConfig())
    before = dict(attention_processors(pipe.transformer))
    adapter = adapter_for(pipe.transformer)
    with pytest.raises(ValueError, match="has no processor beneath it for context parallelism to replace"):
        _install_own_processors(pipe.transformer, adapter, adapter.context_parallel_support(), ring=False)
    assert attention_processors(pipe.transformer) == before
    handle.remove()


@pytest.mark.parametrize(
    "name, even, uneven",
    [
        ("tiny-wan", (1, 4, 3, 16, 16), (1, 4, 3, 18, 18)),  # [B, C, F, H, W], patch 1x2x2: 192 / 243 tokens
        ("tiny-cogvideox", (1, 9, 4, 16, 16), (1, 9, 4, 18, 18)),  # [B, F, C, H, W]
        ("tiny-mochi", (1, 12, 6, 16, 16), (1, 12, 5, 18, 18)),
    ],
)
def test_the_even_shards_check_names_the_geometry(name, even, uneven):
    import torch

    import diffattn
    from diffattn.parallel import even_shards_check

    transformer = diffattn.load_pipeline(name).transformer
    check = even_shards_check(transformer, 2)
    check(transformer, (torch.zeros(even),), {})  # splits evenly: no error
    with pytest.raises(ValueError, match="context_parallel=2 needs video tokens that split into 2 equal shards"):
        check(transformer, (), {"hidden_states": torch.zeros(uneven)})


def test_ring_context_parallelism_is_refused_clearly():
    ring = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1))
    with pytest.raises(ValueError, match="ring context parallelism \\(ring_degree=2\\) is not supported"):
        ulysses_group(ring)
    assert ulysses_group(None) is None
    assert ulysses_group(SimpleNamespace(context_parallel_config=None)) is None


def _beside(command: list[str], env: dict, tmp_path: Path) -> subprocess.Popen:
    """A one-process run started beside a launch (both cores busy), its output in beside.log, not in a pipe that
    nobody reads while the launch runs."""
    with open(tmp_path / "beside.log", "w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_the_command_line_generates_one_video_across_processes(tmp_path, capsys):
    import imageio.v3 as iio
    import numpy as np

    from diffattn.presets import preset_path

    preset_path("tiny-wan")  # built once, before the processes start
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    flags = [
        "generate",
        "-m",
        "tiny-wan",
        "-p",
        "a boat",
        "--num-frames",
        "33",
        "--height",
        "128",
        "--width",
        "128",
        "--steps",
        "3",
        "--radial",
        "--dense-timesteps",
        "1",
        "--dense-layers",
        "0",
        "--block-size",
        "64",
    ]
    # the one-process run (one thread) beside the launch, which waits on its rendezvous part of the time
    single = _beside([sys.executable, "-m", "diffattn", *flags, "--out", str(tmp_path / "one")], env, tmp_path)
    launch = [*torchrun(2), "-m", "diffattn", *flags, "--context-parallel", "2", "--out", str(tmp_path / "two")]
    parallel = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert single.wait(timeout=600) == 0, (tmp_path / "beside.log").read_text()[-2000:]
    assert parallel.returncode == 0, (parallel.stdout + parallel.stderr)[-3000:]
    one = sorted((tmp_path / "one").glob("*.mp4"))
    two = sorted((tmp_path / "two").glob("*.mp4"))
    assert len(one) == len(two) == 1  # process 0 wrote the video, once
    np.testing.assert_array_equal(iio.imread(one[0]), iio.imread(two[0]))
    # 9 frames of 144x144: 3 x 9 x 9 = 243 tokens, not two equal shards: refused with the geometry, nothing written
    uneven = [
        *flags[: flags.index("--num-frames")],
        "--num-frames",
        "9",
        "--height",
        "144",
        "--width",
        "144",
        *flags[flags.index("--steps") :],
        "--context-parallel",
        "2",
        "--out",
        str(tmp_path / "uneven"),
    ]
    refused = subprocess.run([*torchrun(2), "-m", "diffattn", *uneven], env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert refused.returncode != 0
    assert "context_parallel=2 needs video tokens that split into 2 equal shards: 3 latent frames x 9 x 9" in (
        refused.stdout + refused.stderr
    )
    assert not list((tmp_path / "uneven").glob("*.mp4"))
    from diffattn.cli import main

    capsys.readouterr()
    assert main([*flags, "--ring", "--out", str(tmp_path / "r")]) == 2
    assert "--ring needs --context-parallel N" in capsys.readouterr().err


def test_a_batch_job_in_groups_of_context_parallel_processes(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from diffattn.jobs import read_manifests
    from diffattn.presets import preset_path

    preset_path("tiny-wan")
    job = tmp_path / "job.jsonl"
    line = {"model": "tiny-wan", "steps": 2, "num_frames": 33, "height": 128, "width": 128,
            "radial": {"dense_layers": 0, "dense_timesteps": 1, "block_size": 64}}  # fmt: skip
    job.write_text("".join(json.dumps({**line, "prompt": f"a boat {i}", "name": f"v{i}"}) + "\n" for i in range(3)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = _beside([sys.executable, "-m", "diffattn", "batch", str(job), "--out", str(tmp_path / "single")], env,
                     tmp_path)  # fmt: skip
    grouped = subprocess.run(
        [*torchrun(4), "-m", "diffattn", "batch", str(job),
         "--out", str(tmp_path / "grouped"), "--context-parallel", "2"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert single.wait(timeout=600) == 0, (tmp_path / "beside.log").read_text()[-2000:]
    assert grouped.returncode == 0, (grouped.stdout + grouped.stderr)[-3000:]
    assert "3 of 3 outputs done" in grouped.stdout
    records = read_manifests(tmp_path / "grouped")
    assert {r["name"]: r["process"] for r in records.values()} == {"v0-seed0": 0, "v1-seed0": 2, "v2-seed0": 0}
    assert sorted(p.name for p in (tmp_path / "grouped").glob("*.mp4")) == ["v0-seed0.mp4", "v1-seed0.mp4",
                                                                            "v2-seed0.mp4"]  # fmt: skip
    for name in ("v0-seed0.mp4", "v1-seed0.mp4"):
        np.testing.assert_array_equal(iio.imread(tmp_path / "grouped" / name), iio.imread(tmp_path / "single" / name))
