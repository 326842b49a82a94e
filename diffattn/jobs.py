"""Batch generation jobs: a file of prompts in, one output per (prompt, seed) out, on one process or many.

A job file is either plain text (one prompt per line; blank lines and lines starting with `#` are skipped) or JSON
Lines (one object per line, `.jsonl`), whose keys are:

    prompt (required)  name  seed | seeds  model  negative_prompt  steps  guidance_scale  height  width  num_frames
    guidance_interval [start, stop]   maps (bool)
    radial: true | {RadialAttentionConfig fields}     agent: true | {AgentAttentionConfig fields}
    tome: true | {"ratio": r}                         structured: true | {StructuredGuidanceConfig fields}
    astar: true | "astar" | "attend_and_excite" | "both"
    subjects: ["a red circle", ...] (IR-Diffusion)    ir: {IRDiffusionConfig fields}    ir_masks: "auto" | ...

Every line is validated before anything runs; an error names the file, the line, the key and what is allowed. Each
line expands into one *unit* per seed, named `<name>-seed<seed>` (`name` defaults to the line number, `00003`).

Scaling. `run_job` shards the units over the processes of an accelerate launch (`accelerate launch -m diffattn
batch ...`, any number of GPUs or machines): process r of W takes units r, r+W, r+2W, ... of the whole job, so no
process talks to another while generating and each loads its pipeline once, on its own device.

Nothing is lost or overwritten. Outputs are written to a temporary name and linked into place (an existing file
is never replaced: a name already taken gets `-1`, `-2`, ...). A unit is done once its record is appended to its
process's manifest (`manifest-rank<r>.jsonl`, one JSON line, flushed and fsynced); rerunning the same job into the
same folder skips done units, so a crashed or preempted job resumes where it stopped. A folder whose manifest
holds a unit of the same name with different settings is refused. A unit that raises is logged to
`failures-rank<r>.jsonl` and the job goes on; `run_job` reports it and the CLI exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .generation import cached_pipeline, generate_batch, save_result
from .methods.agent_attention import AgentAttentionConfig
from .methods.ir_diffusion import IRDiffusionConfig
from .methods.radial_attention import RadialAttentionConfig
from .methods.structured_guidance import StructuredGuidanceConfig
from .presets import DEFAULT_PRESET


logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SCALARS = {
    "prompt": str,
    "name": str,
    "model": str,
    "negative_prompt": str,
    "steps": int,
    "guidance_scale": float,
    "height": int,
    "width": int,
    "num_frames": int,
    "maps": bool,
    "ir_masks": str,
}
_METHODS = ("radial", "agent", "tome", "structured", "astar", "ir")
ALLOWED_KEYS = tuple(_SCALARS) + ("seed", "seeds", "guidance_interval", "subjects") + _METHODS
ASTAR_LOSSES = ("astar", "attend_and_excite", "both")


@dataclass(frozen=True)
class JobDefaults:
    """What a line that does not say otherwise runs with (the CLI's flags)."""

    model: str = DEFAULT_PRESET
    steps: int | None = None
    seeds: tuple[int, ...] = (0,)
    maps: bool = False


@dataclass
class JobUnit:
    """One output: a prompt with one seed and its settings. `spec` is what the manifest compares on resume."""

    index: int
    name: str
    prompt: str
    seed: int
    model: str
    options: dict[str, Any] = field(default_factory=dict)  # generate() keyword arguments besides model/prompt/seed
    spec: dict[str, Any] = field(default_factory=dict)  # the line's settings as JSON values


class JobFileError(ValueError):
    """A job file that cannot run; the message names the file, the line and the key."""


def _check_type(where: str, key: str, value: Any, kind: type) -> Any:
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise JobFileError(f"{where}: {key}={value!r} is not allowed: expected {kind.__name__}")
    return value


def _method_config(where: str, key: str, value: Any):
    """The method config a line's `radial` / `agent` / `tome` / `structured` / `astar` value asks for (None: off)."""
    if value is False or value is None:
        return None
    if key == "astar":
        loss = "astar" if value is True else value
        if loss not in ASTAR_LOSSES:
            raise JobFileError(f"{where}: astar={value!r} is not allowed: expected true or one of {ASTAR_LOSSES}")
        return loss
    fields = {} if value is True else value
    if not isinstance(fields, dict):
        raise JobFileError(f"{where}: {key}={value!r} is not allowed: expected true or an object of config fields")
    try:
        if key == "radial":
            return RadialAttentionConfig(**fields)
        if key == "agent":
            return AgentAttentionConfig(**fields)
        if key == "ir":
            return IRDiffusionConfig(**fields)
        if key == "tome":
            unknown = set(fields) - {"ratio"}
            if unknown:
                raise ValueError(f"tome takes only 'ratio', got {sorted(unknown)}")
            return AgentAttentionConfig.tome(**fields)
        phrases = fields.get("phrases")
        return StructuredGuidanceConfig(**{**fields, **({"phrases": tuple(phrases)} if phrases else {})})
    except (TypeError, ValueError) as exc:  # unknown field (TypeError) or a bad value (ValueError, names the field)
        raise JobFileError(f"{where}: {key}: {exc}") from None


def _line_units(where: str, index: int, line: dict[str, Any], defaults: JobDefaults) -> list[JobUnit]:
    unknown = sorted(set(line) - set(ALLOWED_KEYS))
    if unknown:
        raise JobFileError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(ALLOWED_KEYS)}")
    values = {k: _check_type(where, k, line[k], kind) for k, kind in _SCALARS.items() if k in line}
    prompt = values.get("prompt", "")
    if not prompt.strip():
        raise JobFileError(f"{where}: prompt={prompt!r} is not allowed: expected a non-empty string")
    name = values.get("name", f"{index:05d}")
    if not _NAME.match(name):
        raise JobFileError(f"{where}: name={name!r} is not allowed: expected letters, digits, '.', '_' or '-'")
    for key in ("steps", "height", "width", "num_frames"):
        if key in values and values[key] < 1:
            raise JobFileError(f"{where}: {key}={values[key]} is not allowed: expected an int >= 1")
    if "seed" in line and "seeds" in line:
        raise JobFileError(f"{where}: give seed or seeds, not both")
    seeds = [line["seed"]] if "seed" in line else line.get("seeds", list(defaults.seeds))
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise JobFileError(f"{where}: seeds={seeds!r} is not allowed: expected a non-empty list of ints >= 0")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise JobFileError(f"{where}: seeds={seeds!r} is not allowed: expected distinct ints >= 0")
    options: dict[str, Any] = {
        k: values[k]
        for k in ("negative_prompt", "steps", "guidance_scale", "height", "width", "num_frames")
        if k in values
    }
    options.setdefault("steps", defaults.steps)
    options["attention_maps"] = values.get("maps", defaults.maps)
    if "guidance_interval" in line:
        interval = line["guidance_interval"]
        if not (
            isinstance(interval, list) and len(interval) == 2 and all(isinstance(v, (int, float)) for v in interval)
        ):
            raise JobFileError(f"{where}: guidance_interval={interval!r} is not allowed: expected [start, stop]")
        options["guidance_interval"] = tuple(float(v) for v in interval)
    if "subjects" in line:
        subjects = line["subjects"]
        if not (isinstance(subjects, list) and subjects and all(isinstance(p, str) and p.strip() for p in subjects)):
            raise JobFileError(f"{where}: subjects={subjects!r} is not allowed: expected a list of subject prompts")
        options["subjects"] = subjects
    elif "ir" in line or "ir_masks" in line:
        raise JobFileError(f"{where}: ir and ir_masks need subjects (one prompt per subject)")
    if "ir_masks" in values:
        options["masks"] = values["ir_masks"]
    configs = {key: _method_config(where, key, line.get(key)) for key in _METHODS}
    if configs["agent"] is not None and configs["tome"] is not None:
        raise JobFileError(f"{where}: agent and tome are alternatives: give one")
    for key, config in configs.items():
        if config is not None:
            options["agent" if key == "tome" else key] = config
    model = values.get("model", defaults.model)
    spec = {k: v for k, v in line.items() if k not in ("seed", "seeds", "name")}
    spec.setdefault("model", model)
    spec.setdefault("steps", defaults.steps)
    spec.setdefault("maps", defaults.maps)
    return [
        JobUnit(index, f"{name}-seed{seed}", prompt, seed, model, dict(options), {**spec, "seed": seed})
        for seed in seeds
    ]


def read_job(path: str | Path, defaults: JobDefaults | None = None) -> list[JobUnit]:
    """Parse and validate a job file (`.jsonl` as JSON Lines, anything else as one prompt per line) into units."""
    path = Path(path)
    defaults = defaults or JobDefaults()
    if not path.is_file():
        raise JobFileError(f"job file {str(path)!r} does not exist")
    units: list[JobUnit] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path.name} line {number}"
        if path.suffix == ".jsonl":
            try:
                line = json.loads(text)
            except json.JSONDecodeError as exc:
                raise JobFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(line, dict):
                raise JobFileError(f"{where}: expected a JSON object, got {type(line).__name__}")
        else:
            line = {"prompt": text}
        units.extend(_line_units(where, number, line, defaults))
    if not units:
        raise JobFileError(f"job file {path.name} has no prompts")
    seen: dict[str, int] = {}
    for unit in units:
        if unit.name in seen:
            raise JobFileError(
                f"{path.name} line {unit.index}: output name {unit.name!r} is already used by line {seen[unit.name]}"
            )
        seen[unit.name] = unit.index
    return units


def shard(units: list[JobUnit], process_index: int, num_processes: int) -> list[JobUnit]:
    """The units process `process_index` of `num_processes` runs: every num_processes-th, from its index."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} is not in [0, {num_processes})")
    return units[process_index::num_processes]


def read_manifests(out: Path) -> dict[str, dict[str, Any]]:
    """Done units of earlier runs into `out`: name -> manifest record (from every process's manifest)."""
    done: dict[str, dict[str, Any]] = {}
    for manifest in sorted(Path(out).glob("manifest-rank*.jsonl")):
        for text in manifest.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write: that unit is not done and runs again
            done[record["name"]] = record
    return done


def _append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "ab+") as f:
        # a line cut by a crash has no newline; start after it, or the new record would be glued to it and lost
        f.seek(0, os.SEEK_END)
        cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
        f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class JobReport:
    """What one process (`process_index` of `num_processes`) did: units it generated, skipped as done, that failed."""

    process_index: int = 0
    num_processes: int = 1
    generated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _batch_key(unit: JobUnit) -> str | None:
    """Units with equal keys may share a pipeline call; None: this unit runs alone (its own pipeline or one prompt
    per call: A-STAR, IR-Diffusion, structured guidance)."""
    options = unit.options
    if options.get("astar") or options.get("subjects") or options.get("structured") is not None:
        return None
    return json.dumps([unit.model, sorted((k, repr(v)) for k, v in options.items())])


def batches(units: list[JobUnit], batch_size: int) -> list[list[JobUnit]]:
    """Consecutive units with the same settings (all but prompt and seed) in groups of at most `batch_size`."""
    groups: list[list[JobUnit]] = []
    for unit in units:
        key = _batch_key(unit)
        last = groups[-1] if groups else None
        if last and key is not None and _batch_key(last[0]) == key and len(last) < batch_size:
            last.append(unit)
        else:
            groups.append([unit])
    return groups


def run_job(
    units: list[JobUnit],
    out: str | Path,
    *,
    process_index: int | None = None,
    num_processes: int | None = None,
    device: str | None = None,
    torch_dtype: str | None = None,
    batch_size: int = 1,
) -> JobReport:
    """Run this process's share of `units` into `out`, skipping the ones its manifests record as done.

    Without `process_index`/`num_processes` they come from accelerate's `PartialState` (one process when not
    launched), and the device defaults to that process's device. `batch_size`: prompts per pipeline call, for
    consecutive units with the same settings (each keeps its own seed's noise). Returns this process's `JobReport`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed: expected an int >= 1")
    out = Path(out)
    state = None
    if process_index is None or num_processes is None:
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
        process_index, num_processes = state.process_index, state.num_processes
        if device is None and state.device.type != "cpu":
            device = str(state.device)
    out.mkdir(parents=True, exist_ok=True)
    done = read_manifests(out)
    for unit in units:  # a folder holding another job's outputs under the same names is refused, before any work
        record = done.get(unit.name)
        if record is not None and record.get("spec") != unit.spec:
            raise JobFileError(
                f"{out} already holds {unit.name!r} made with other settings ({record.get('spec')}); use a new --out"
            )
    mine = shard(units, process_index, num_processes)
    manifest = out / f"manifest-rank{process_index}.jsonl"
    failures = out / f"failures-rank{process_index}.jsonl"
    report = JobReport(process_index, num_processes)
    pending = []
    for unit in mine:
        if unit.name in done:
            report.skipped.append(unit.name)
        else:
            pending.append(unit)
    bar = tqdm(total=len(mine), initial=len(report.skipped), desc=f"batch {process_index + 1}/{num_processes}",
               position=process_index, unit="image")  # fmt: skip
    for group in batches(pending, batch_size):
        first = group[0]
        try:
            pipe = cached_pipeline(first.model, torch_dtype, device)
            pipe.set_progress_bar_config(disable=True)  # the job's bar is the progress; one per call would flood
            results = generate_batch(
                first.model, [u.prompt for u in group], [u.seed for u in group], pipe=pipe, **first.options
            )
            saved = [save_result(result, out, unit.name) for result, unit in zip(results, group)]
        except Exception as exc:  # one bad call (out of memory, a model that does not load) must not stop the job
            logger.exception("units %s failed", [u.name for u in group])
            for unit in group:
                error = {"name": unit.name, "error": f"{type(exc).__name__}: {exc}", "time": time.time()}
                _append_record(failures, error)
                report.failed.append(unit.name)
            bar.update(len(group))
            continue
        for unit, result, files in zip(group, results, saved):
            record = {
                "name": unit.name,
                "prompt": unit.prompt,
                "seed": unit.seed,
                "files": [p.name for p in files],
                "seconds": round(result.seconds, 4),
                "batch": len(group),
                "process": process_index,
                "spec": unit.spec,
            }
            _append_record(manifest, record)
            report.generated.append(unit.name)
        bar.update(len(group))
    bar.close()
    logger.info(
        "process %d/%d: %d generated, %d already done, %d failed",
        process_index, num_processes, len(report.generated), len(report.skipped), len(report.failed),
    )  # fmt: skip
    if state is not None:
        state.wait_for_everyone()  # so the main process can check the whole job once every process is done
    return report


def missing_units(units: Iterable[JobUnit], out: str | Path) -> list[str]:
    """Names of the units `out`'s manifests do not record as done (after every process finished)."""
    done = read_manifests(Path(out))
    return [u.name for u in units if u.name not in done]
