"""The one validation layer: every public config refuses bad input with ValueError/TypeError only (property-based),
accepted values never make NaN output, and every face (generate, the request, job files, the CLI, the UI) refuses
the same inputs with the same message."""

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffattn
from diffattn.cli import main
from diffattn.generation import generate
from diffattn.guidance import GuidanceInterval
from diffattn.jobs import JobFileError, read_job
from diffattn.limits import Limits
from diffattn.methods.ir_mask_recorder import SubjectMaskConfig
from diffattn.request import GenerationRequest
from diffattn.shapes_training import ShapesTrainingConfig
from diffattn.shapes_video_training import ShapesVideoTrainingConfig

from helpers import load


CONFIGS = [
    diffattn.AgentAttentionConfig,
    diffattn.AttentionMapConfig,
    diffattn.RadialAttentionConfig,
    diffattn.StructuredGuidanceConfig,
    diffattn.IRDiffusionConfig,
    GuidanceInterval,
    Limits,
    ShapesTrainingConfig,
    ShapesVideoTrainingConfig,
    SubjectMaskConfig,
]

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-5, 300), st.text(max_size=4), st.floats()), max_size=4),
    st.tuples(st.integers(-5, 300), st.integers(-5, 300)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sets(st.integers(0, 8), max_size=3),
)


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_configs_raise_only_value_or_type_errors(config_class, data):
    names = [f.name for f in dataclasses.fields(config_class)]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    kwargs = {name: data.draw(ANY_VALUE, label=name) for name in chosen}
    try:
        config = config_class(**kwargs)
    except (ValueError, TypeError) as exc:
        assert str(exc)
        return
    for name in chosen:  # what was accepted is finite and of the declared kind
        value = getattr(config, name)
        if isinstance(value, float):
            assert math.isfinite(value)
        assert not isinstance(value, (str, dict, set)) or isinstance(kwargs[name], str)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_request_raises_only_value_or_type_errors(data):
    names = [f.name for f in dataclasses.fields(GenerationRequest) if f.name not in ("model", "prompt")]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    kwargs = {name: data.draw(ANY_VALUE, label=name) for name in chosen}
    try:
        request = GenerationRequest("tiny-sd", "a cat", **kwargs)
    except (ValueError, TypeError):
        return
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: diffattn.AgentAttentionConfig(agent_scale_power=float("nan")), "agent_scale_power=nan"),
        (lambda: diffattn.AgentAttentionConfig(agent_scale_power=float("inf")), "agent_scale_power=inf"),
        (lambda: diffattn.AgentAttentionConfig(seed=2**64), "seed=18446744073709551616 is not allowed"),
        (lambda: diffattn.AgentAttentionConfig(levels={1: "x"}), "levels={1: 'x'} is not allowed"),
        (lambda: diffattn.AttentionMapConfig(keep_grad="no"), "keep_grad='no' is not allowed: expected True or False"),
        (lambda: diffattn.StructuredGuidanceConfig(phrases={"a": 1}), "phrases={'a': 1} is not allowed"),
        (lambda: diffattn.StructuredGuidanceConfig(phrases="circle"), "phrases='circle' is not allowed"),
        (lambda: diffattn.RadialAttentionConfig(decay_factor=float("inf")), "decay_factor=inf is not allowed"),
        (lambda: diffattn.IRDiffusionConfig(seed=2**63), "seed=9223372036854775808 is not allowed"),
        (lambda: GuidanceInterval(0.5, 0.2), "expected start < stop"),
    ],
)
def test_known_bad_config_values_are_refused(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


def _finite_unet_output(pipe, config) -> bool:
    handle = diffattn.apply(pipe.unet, config)
    try:
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = pipe.unet(latents, torch.tensor(500), encoder_hidden_states=text).sample
    finally:
        handle.remove()
    return bool(torch.isfinite(out).all())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ratio=st.floats(0, 0.99),
    agent_ratio=st.one_of(st.none(), st.floats(0, 1)),
    stride=st.integers(2, 16),
    agent_scale_power=st.floats(0, 2),
    shortcut=st.floats(0, 10),
)
def test_accepted_agent_configs_never_make_nan(ratio, agent_ratio, stride, agent_scale_power, shortcut):
    config = diffattn.AgentAttentionConfig(
        ratio=ratio, agent_ratio=agent_ratio, stride=stride, agent_scale_power=agent_scale_power, shortcut=shortcut
    )
    assert _finite_unet_output(_tiny_sd(), config)


_PIPES = {}


def _tiny_sd():
    if "tiny-sd" not in _PIPES:
        _PIPES["tiny-sd"] = load("tiny-sd")
    return _PIPES["tiny-sd"]


@settings(max_examples=10, deadline=None)
@given(decay_factor=st.floats(1e-6, 100.0), block=st.sampled_from([64, 128]))
def test_accepted_radial_configs_never_make_nan(decay_factor, block):
    if "tiny-wan" not in _PIPES:
        _PIPES["tiny-wan"] = load("tiny-wan")
    transformer = _PIPES["tiny-wan"].transformer
    config = diffattn.RadialAttentionConfig(decay_factor=decay_factor, block_size=block, dense_timesteps=0)
    handle = diffattn.apply(transformer, config)
    try:
        c = transformer.config
        latents = torch.randn(1, c.in_channels, 5, 16, 16, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 8, c.text_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = transformer(latents, torch.tensor([500]), text).sample
    finally:
        handle.remove()
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ every face, same message

BAD_INPUTS = [
    # (request field, value, job-file value, CLI flags, message every face shows)
    ("steps", 10**12, 10**12, ["--steps", str(10**12)], "steps=1000000000000 is not allowed: the limit is max_steps"),
    ("steps", 0, 0, ["--steps", "0"], "steps=0 is not allowed: expected an int >= 1"),
    ("height", 7, 7, ["--height", "7"], "height=7 is not allowed: expected an int >= 8"),
    ("height", 100000, 100000, ["--height", "100000"], "height=100000 is not allowed: the limit is max_side"),
    ("height", 100, 100, ["--height", "100"], "height=100 is not allowed: expected a multiple of 8"),
    ("num_frames", 100000, 100000, ["--num-frames", "100000"], "num_frames=100000 is not allowed: the limit"),
    ("guidance_scale", float("inf"), "Infinity", ["--guidance-scale", "inf"], "guidance_scale=inf is not allowed"),
    ("guidance_scale", float("nan"), "NaN", ["--guidance-scale", "nan"], "guidance_scale=nan is not allowed"),
    ("guidance_interval", (0.5, 0.2), [0.5, 0.2], ["--guidance-interval", "0.5", "0.2"], "guidance_interval="),
    ("seed", 2**64, 2**64, ["--seed", str(2**64)], "seed=18446744073709551616 is not allowed"),
]


@pytest.mark.parametrize("field, value, job_value, flags, message", BAD_INPUTS)
def test_every_face_refuses_the_same_input_with_the_same_message(
    tmp_path, capsys, field, value, job_value, flags, message
):
    # generate(): refused before any pipeline is loaded (the model does not even exist)
    with pytest.raises(ValueError) as info:
        generate("no-such-model-anywhere", "a cat", **{field: value})
    assert message in str(info.value)
    if field == "guidance_interval":
        assert "expected a pair [start, stop] of numbers with 0.0 <= start < stop <= 1.0" in str(info.value)
    # a job file: the same message, after the file and line
    job = tmp_path / "job.jsonl"
    value_text = json.dumps(job_value) if not isinstance(job_value, str) else job_value
    job.write_text('{"prompt": "a cat", "' + field + '": ' + value_text + "}\n")
    with pytest.raises(JobFileError) as info:
        read_job(job)
    assert str(info.value).startswith("job.jsonl line 1: ") and message in str(info.value)
    # the command line: one line, exit 2, before any work
    code = main(["generate", "-m", "no-such-model-anywhere", "-p", "a cat", "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_the_ui_refuses_with_the_same_message():
    import importlib.util
    import sys
    from pathlib import Path

    import gradio as gr

    spec = importlib.util.spec_from_file_location("diffattn_app_v", Path(__file__).parent.parent / "app.py")
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app
    spec.loader.exec_module(app)
    app.build_demo()
    with pytest.raises(gr.Error, match="guidance_scale=inf is not allowed"):
        app.run_generation("tiny-sd", "a cat", "", 2, 0, float("inf"), 128, 128, 0)
    with pytest.raises(gr.Error, match="height x width=4096x4096 .* is not allowed: the limit is max_pixels"):
        app.run_generation("tiny-sd", "a cat", "", 2, 0, 5.0, 4096, 4096, 0)
    # guidance 0 is used as given, not replaced by the preset's 7.5
    image, *_, info = app.run_generation("tiny-sd", "a cat", "", 1, 0, 0.0, 128, 128, 0)
    assert image.size == (128, 128)


def test_job_files_that_are_not_text_or_too_deep_name_the_file_and_line(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "ok"}\n' + "[" * 50_000 + "\n")
    with pytest.raises(JobFileError, match="deep.jsonl line 2: JSON nested deeper than 64 levels"):
        read_job(deep)
    deep.write_text('{"prompt": "ok"}\n' + "[" * 200_000 + "\n")
    with pytest.raises(JobFileError, match="deep.jsonl line 2: 200,000 characters is not allowed"):
        read_job(deep)
    binary = tmp_path / "model.jsonl"
    binary.write_bytes(b'{"prompt": "ok"}\n\x89PNG\r\n\x1a\n\xff\xfe\x00\x00')
    with pytest.raises(JobFileError, match="model.jsonl line 2: not UTF-8 text"):
        read_job(binary)
    for text, message in [
        ('{"prompt": "a", "structured": {"phrases": "circle"}}', "structured: phrases='circle' is not allowed"),
        ('{"prompt": "a", "agent": {"agent_scale_power": NaN}}', "agent: agent_scale_power=nan is not allowed"),
        (
            '{"prompt": "a", "subjects": ["a"], "ir_masks": "magic"}',
            "ir_masks='magic' is not allowed: expected one of",
        ),
        ('{"prompt": "a", "seeds": [0, 18446744073709551616]}', "seeds=18446744073709551616 is not allowed"),
        ('{"prompt": "a", "maps": "no"}', "maps='no' is not allowed: expected True or False"),
        ('{"prompt": "a", "astar": true, "agent": true}', "astar (A-STAR) runs its own pipeline and does not combine"),
    ]:
        job = tmp_path / "job.jsonl"
        job.write_text(text + "\n")
        with pytest.raises(JobFileError, match="job.jsonl line 1: ") as info:
            read_job(job)
        assert message in str(info.value)


def test_requests_round_trip_through_json():
    request = GenerationRequest(
        "tiny-wan", "a boat", seed=2**63 - 1, steps=3, guidance_interval=(0.2, 0.9), num_frames=9,
        radial=diffattn.RadialAttentionConfig(decay_factor=0.5, sink_frames=0), attention_maps=False,
    )  # fmt: skip
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    ir = GenerationRequest("shapes-sd", "a red circle and a blue square", subjects=("a red circle", "a blue square"),
                           ir=diffattn.IRDiffusionConfig(mask_dropout=0.0), masks="segmenter")  # fmt: skip
    assert GenerationRequest.from_dict(json.loads(json.dumps(ir.to_dict()))) == ir
    with pytest.raises(ValueError, match="unknown request field 'colour'"):
        GenerationRequest.from_dict({"model": "x", "prompt": "y", "colour": 1})
    # a config's unknown field and a missing field are named, not Python's keyword-argument messages
    with pytest.raises(
        ValueError, match="radial: unknown field 'decay' of RadialAttentionConfig; allowed: dense_layers"
    ):
        GenerationRequest.from_dict({"model": "x", "prompt": "y", "radial": {"decay": 1}})
    with pytest.raises(ValueError, match="a request needs the field\\(s\\) model; got prompt, steps"):
        GenerationRequest.from_dict({"prompt": "y", "steps": 2})


@pytest.mark.parametrize(
    # each family's time compression (its autoencoder's): the first frame alone, then `step` frames a latent frame
    "model, step",
    [("tiny-wan", 4), ("tiny-hunyuan-video", 4), ("tiny-cogvideox", 4), ("tiny-ltx-video", 8), ("tiny-mochi", 6)],
)
def test_a_video_has_the_frames_asked_or_is_refused_naming_the_counts_allowed(model, step):
    asked, steps = 1 + 2 * step, 2 if model == "tiny-mochi" else 1
    result = generate(model, "a boat", num_frames=asked, steps=steps)
    assert len(result.frames) == asked
    # one more or one fewer would have been rounded (Wan) or floored (the others) by the pipeline, silently
    for wrong, nearest in ((asked + 1, (asked, asked + step)), (asked - 1, (asked - step, asked))):
        message = (
            f"num_frames={wrong} is not allowed for '{model}': .* 1 \\+ a multiple of {step} frames "
            f"\\({nearest[0]} or {nearest[1]}\\)"
        )
        with pytest.raises(ValueError, match=message):
            generate(model, "a boat", num_frames=wrong, steps=steps)


def test_mochi_with_one_step_is_refused_naming_the_field():
    # diffusers' Mochi schedule divides by steps // 2: one step would end in a ZeroDivisionError
    with pytest.raises(ValueError, match="steps=1 is not allowed for 'tiny-mochi': .* at least 2 steps"):
        generate("tiny-mochi", "a boat", num_frames=13, steps=1)


def test_every_video_preset_runs_at_frame_counts_its_autoencoder_keeps():
    from diffattn.presets import PRESETS

    time_compression = {"wan": 4, "hunyuan-video": 4, "cogvideox": 4, "ltx-video": 8, "mochi": 6}
    for preset in (p for p in PRESETS.values() if p.kind == "video"):
        for frames in (preset.call_defaults["num_frames"], preset.compare_frames):
            assert (frames - 1) % time_compression[preset.family] == 0, (preset.name, frames)


@pytest.mark.parametrize(
    # one video token's side in pixels: the autoencoder's spatial compression times the transformer's patch (not
    # tiny-ltx-video: its autoencoder compresses 8x with patch 1, every request's multiple of 8 already)
    "model, side",
    [("tiny-wan", 16), ("tiny-hunyuan-video", 16), ("tiny-cogvideox", 16), ("tiny-mochi", 16)],
)
def test_a_video_size_that_is_not_whole_tokens_is_refused_naming_the_sizes_allowed(model, side):
    for field, size in (("height", 128 + side // 2), ("width", 128 - side // 2)):
        low = size // side * side
        with pytest.raises(ValueError, match=f"{field}={size} is not allowed for '{model}': expected a multiple of "
                                             f"{side} pixels .*{low} or {low + side}"):  # fmt: skip
            generate(model, "a boat", steps=2, **{field: size})


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-sd"])
def test_a_prompt_longer_than_the_model_reads_is_noted_with_the_end_it_lost(model, tmp_path):
    import logging
    import re

    from diffusers.utils import logging as diffusers_logging

    from diffattn.generation import cached_pipeline
    from diffattn.jobs import JobDefaults, read_job, run_job

    prompt = " ".join(["a red circle moving right"] * 20) + " and a blue cat"  # over 77 CLIP and 32 T5 tokens
    cut = []  # the reference: diffusers' own report of the text it cut (CLIP's 77 tokens; max_sequence_length)
    handler = logging.Handler()
    handler.emit = lambda record: cut.append(record.getMessage())
    verbosity = diffusers_logging.get_verbosity()  # the command line's tests leave diffusers at errors only
    diffusers_logging.set_verbosity_warning()
    logging.getLogger("diffusers").addHandler(handler)
    try:
        long = generate(model, prompt, steps=1)
        short = generate(model, "a red circle", steps=1)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
        diffusers_logging.set_verbosity(verbosity)
    lost = [re.search(r"\['(.*)'\]", m).group(1) for m in cut if "was truncated" in m]
    assert lost and len(set(lost)) == 1
    tokens = len(cached_pipeline(model).tokenizer(prompt, verbose=False).input_ids)
    reads = {"tiny-cogvideox": 32, "tiny-sd": 77}[model]  # the preset's max_sequence_length; CLIP's length
    assert tokens > reads
    assert long.notes == [f"the prompt is {tokens} tokens and '{model}' reads {reads}: the end, {lost[0].strip()!r}, "
                          "was not seen"]  # fmt: skip
    assert short.notes == []
    # a batch job keeps the note in the output's record
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": prompt, "name": "long"}) + "\n" + json.dumps({"prompt": "a cat"}) + "\n")
    out = tmp_path / "out"
    run_job(read_job(job, JobDefaults(model=model, steps=1)), out, process_index=0, num_processes=1)
    records = {r["name"]: r for r in diffattn.jobs.read_manifests(out).values()}
    assert records["long-seed0"]["notes"] == long.notes
    assert "notes" not in records["00002-seed0"]


def test_a_radial_run_that_computes_dense_attention_throughout_says_so(caplog):
    """A radial request whose dense steps cover the run, or whose mask keeps every block at its size, would save a
    video named radial that is dense attention's: the result, the log and the UI's compare table say so."""
    import logging

    import app
    from diffattn.methods.radial_attention import RadialAttentionConfig
    from diffattn.methods.radial_mask import radial_block_mask

    def radial(**fields):
        return RadialAttentionConfig(**{"dense_layers": 0, "dense_timesteps": 0, **fields})  # 128-token blocks

    with caplog.at_level(logging.WARNING, logger="diffattn.generation"):
        covered = generate("tiny-wan", "a cat", steps=2, radial=radial(dense_timesteps=1, dense_last_timesteps=1))
    assert covered.radial_density is None and covered.notes == [
        "radial attention ran no step sparse: dense_timesteps=1 and dense_last_timesteps=1 cover all 2 steps, so the "
        "video is dense attention's (run more steps, or fewer dense ones: the paper keeps about the first quarter "
        "dense)"
    ]
    assert covered.notes[0] in caplog.text
    # tiny-wan's 9 frames of 128 px are 3 latent frames of 8 x 8 tokens, 33 frames 9: with 128-token blocks (two
    # frames a block) the first keeps every block, the second 64% (the mask as the method builds it, Wan's sink 1)
    whole, sparse = (float(radial_block_mask(f, 64, block_size=128, decay_factor=1.0, sink_frames=1).float().mean())
                     for f in (3, 9))  # fmt: skip
    assert whole == 1.0 and sparse < 1.0
    small = generate("tiny-wan", "a cat", steps=1, radial=radial())
    assert (
        small.radial_density == 1.0 and len(small.notes) == 1 and "keeps every block (density 100%)" in small.notes[0]
    )
    long = generate("tiny-wan", "a cat", steps=1, num_frames=33, radial=radial())
    assert long.radial_density == pytest.approx(sparse) and long.notes == []
    # the UI's compare table shows the radial run's note, not only the plain run's (its radial settings: one dense
    # step, so one step runs dense throughout)
    table = app.run_compare("tiny-wan", "a cat", 0, 1, [], None, frames=33)[4]
    assert (
        "**note:** radial attention ran no step sparse: dense_timesteps=1 and dense_last_timesteps=0 cover all 1 "
        in table
    )
    assert "mask density" not in table


def test_structured_guidance_with_nothing_to_bind_says_so():
    """A prompt whose only noun phrase is the whole prompt gives structured guidance nothing to bind: the image is
    plain cross-attention's (checked against the plain image), and the result and the log say so."""
    import numpy as np

    from diffattn.methods.structured_guidance import StructuredGuidanceConfig

    lone = generate("shapes-sd", "A red circle.", steps=1, structured=StructuredGuidanceConfig())
    plain = generate("shapes-sd", "A red circle.", steps=1)
    difference = np.abs(np.asarray(lone.images[0], dtype=int) - np.asarray(plain.images[0], dtype=int)).max()
    assert difference <= 2  # the same image but for float rounding in the structured processor
    assert lone.notes == [
        "structured guidance found no noun phrase in the prompt but the whole prompt (['a red circle']), so the image "
        "is plain cross-attention's (it binds attributes to two or more phrases, e.g. 'a red circle and a blue "
        "square')"
    ]
    bound = generate("shapes-sd", "a red circle and a blue square", steps=1, structured=StructuredGuidanceConfig())
    assert bound.notes == []
    given = StructuredGuidanceConfig(phrases=())  # phrases given, none: nothing to bind either
    assert len(generate("shapes-sd", "a red circle and a blue square", steps=1, structured=given).notes) == 1
