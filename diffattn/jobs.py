"""Batch generation jobs: a file of prompts in, one output per (prompt, seed) out, on one process or many.

A job file is either plain text (one prompt per line; blank lines and lines starting with `#` are skipped) or JSON
Lines (one object per line, `.jsonl`), whose keys are:

    prompt (required)  name  seed | seeds  model  negative_prompt  steps  guidance_scale  height  width  num_frames
    guidance_interval [start, stop]   maps (bool)
    radial: true | {RadialAttentionConfig fields}     agent: true | {AgentAttentionConfig fields}
    tome: true | {"ratio": r}                         structured: true | {StructuredGuidanceConfig fields}
    astar: true | "astar" | "attend_and_excite" | "both"
    subjects: ["a red circle", ...] (IR-Diffusion)    ir: {IRDiffusionConfig fields}    ir_masks: "auto" | ...

Every line is validated, as a `GenerationRequest` per seed and against the size `Limits`, before anything runs; an
error names the file, the line, the field, the value and what is allowed. Each line expands into one *unit* per
seed, named `<name>-seed<seed>` (`name` defaults to the line number, `00003`).

Scaling. `run_job` shards the units over the processes of an accelerate launch (`accelerate launch -m diffattn
batch ...`, any number of GPUs or machines): process r of W takes units r, r+W, r+2W, ... of the whole job, so no
process talks to another while generating and each loads its pipeline once, on its own device.

Exactly once, whatever the moment of a crash. A unit's files and its manifest record form one transaction:

1. every file is written under a hidden temporary name (`.<file>.tmp-rank<r>`) and fsynced;
2. the unit's record is appended to the process's manifest (`manifest-rank<r>.jsonl`) and fsynced: the commit;
3. each temporary file is linked to its own name (never replacing a file), the folder is fsynced, the temporaries
   are removed.

A run first recovers the folder: records whose files are not all linked are completed from their temporaries
(roll forward), temporaries no record names are removed (the unit had not committed: it runs again), and a
manifest line cut by the crash is dropped. So a rerun of the same job ends with every output present once under its
own name, one record per output naming files that exist, and no file that existed before replaced. A folder is
written by one run at a time: each process holds `.lock-rank<r>` (PID and host inside) and a second run is refused
at once, naming the holder; the lock of a process that died on this host is taken over. A name that is already
taken by a file no record names is never overwritten: that unit fails, saying so. A folder whose manifest holds a
unit of the same name with different settings is refused. A unit that raises is logged to `failures-rank<r>.jsonl`
and the job goes on; `run_job` reports it and the CLI exits non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .generation import cached_pipeline, check_request_limits, generate_batch, radial_defaults
from .job_store import (
    LOCK_FILE,
    RANK_FILE,
    TEMP_FILE,
    FolderLock,
    JobLockError,
    all_ranks_agree,
    append_record,
    commit_unit,
    fault,
    locked_by_live_process,
    read_manifests,
    recover,
)
from .limits import Limits
from .loading import default_device, parse_device
from .methods.agent_attention import AgentAttentionConfig
from .methods.ir_diffusion import IRDiffusionConfig
from .methods.radial_attention import RadialAttentionConfig
from .methods.structured_guidance import StructuredGuidanceConfig
from .presets import DEFAULT_PRESET
from .request import ASTAR_LOSSES, GenerationRequest
from .validation import check_bool, check_config_fields, check_int_range, check_seed, check_seed_list, check_str


logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_METHODS = ("radial", "agent", "tome", "structured", "astar", "ir")
# job-file key -> GenerationRequest field, for the keys whose value goes to the request as it is
_REQUEST_KEYS = {
    "prompt": "prompt",
    "model": "model",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "guidance_scale": "guidance_scale",
    "guidance_interval": "guidance_interval",
    "height": "height",
    "width": "width",
    "num_frames": "num_frames",
    "maps": "attention_maps",
    "subjects": "subjects",
    "ir_masks": "masks",
}
ALLOWED_KEYS = tuple(_REQUEST_KEYS) + ("name", "seed", "seeds") + _METHODS
MAX_LINE_CHARS = 100_000
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class JobDefaults:
    """What a line that does not say otherwise runs with (the CLI's flags)."""

    model: str = DEFAULT_PRESET
    steps: int | None = None
    seeds: tuple[int, ...] = (0,)
    maps: bool = False


@dataclass
class JobUnit:
    """One output: its line, its name and the request that makes it. `spec` (the line's settings as JSON values) is
    what the manifest compares on resume."""

    index: int
    name: str
    request: GenerationRequest
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def model(self) -> str:
        return self.request.model


class JobFileError(ValueError):
    """A job file that cannot run; the message names the file, the line and the key."""


def _method_config(key: str, value: Any, model: str):
    """The method config a line's `radial` / `agent` / `tome` / `structured` / `astar` value asks for (None: off);
    `radial` fields go over the model's radial defaults."""
    if value is False or value is None:
        return None
    if key == "astar":
        loss = "astar" if value is True else value
        if not isinstance(loss, str) or loss not in ASTAR_LOSSES:
            raise ValueError(f"astar={value!r} is not allowed: expected true or one of {', '.join(ASTAR_LOSSES)}")
        return loss
    fields = {} if value is True else value
    if not isinstance(fields, dict):
        raise ValueError(f"{key}={value!r} is not allowed: expected true or an object of config fields")
    if key == "tome":
        unknown = set(fields) - {"ratio"}
        if unknown:
            raise ValueError(f"tome takes only 'ratio', got {sorted(unknown)}")
    else:
        kind = {"radial": RadialAttentionConfig, "agent": AgentAttentionConfig, "ir": IRDiffusionConfig}
        check_config_fields(key, fields, kind.get(key, StructuredGuidanceConfig))
    try:
        if key == "radial":
            return dataclasses.replace(radial_defaults(model), **fields)
        if key == "agent":
            return AgentAttentionConfig(**fields)
        if key == "ir":
            return IRDiffusionConfig(**fields)
        if key == "tome":
            return AgentAttentionConfig.tome(**fields)
        return StructuredGuidanceConfig(**fields)
    except (TypeError, ValueError) as exc:  # a bad value: the config's message names the field
        raise ValueError(f"{key}: {exc}") from None


def _in_job_terms(message: str) -> str:
    """A request's message about `attention_maps=...` / `masks=...` named by the job file's key (`maps`,
    `ir_masks`)."""
    for key, name in _REQUEST_KEYS.items():
        if key != name and message.startswith(f"{name}="):
            return key + message[len(name) :]
    return message


def _line_units(
    where: str, index: int, line: dict[str, Any], defaults: JobDefaults, limits: Limits | None
) -> list[JobUnit]:
    unknown = sorted(set(line) - set(ALLOWED_KEYS))
    if unknown:
        raise JobFileError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(ALLOWED_KEYS)}")
    try:
        name = check_str("name", line.get("name", f"{index:05d}"), max_length=100)
        if not _NAME.match(name):
            raise ValueError(f"name={name!r} is not allowed: expected letters, digits, '.', '_' or '-'")
        if "seed" in line and "seeds" in line:
            raise ValueError("give seed or seeds, not both")
        if "seed" in line:
            seeds = (check_seed("seed", line["seed"]),)
        else:
            seeds = check_seed_list("seeds", line.get("seeds", list(defaults.seeds)))
        fields = {_REQUEST_KEYS[k]: line[k] for k in _REQUEST_KEYS if k in line}
        fields.setdefault("prompt", "")
        fields.setdefault("model", defaults.model)
        fields.setdefault("steps", defaults.steps)
        fields.setdefault("attention_maps", defaults.maps)
        check_bool("maps", fields["attention_maps"])
        configs = {key: _method_config(key, line.get(key), fields["model"]) for key in _METHODS}
        if configs["agent"] is not None and configs["tome"] is not None:
            raise ValueError("agent and tome are alternatives: give one")
        for key, config in configs.items():
            if config is not None:
                fields["agent" if key == "tome" else key] = config
        requests = [GenerationRequest(seed=seed, **fields) for seed in seeds]
        check_request_limits(requests[0], limits)
    except (TypeError, ValueError) as exc:
        raise JobFileError(f"{where}: {_in_job_terms(str(exc))}") from None
    spec = {k: v for k, v in line.items() if k not in ("seed", "seeds", "name")}
    spec.setdefault("model", fields["model"])
    spec.setdefault("steps", defaults.steps)
    spec.setdefault("maps", defaults.maps)
    return [JobUnit(index, f"{name}-seed{r.seed}", r, {**spec, "seed": r.seed}) for r in requests]


def _json_depth_ok(text: str) -> bool:
    """False for text nesting deeper than MAX_JSON_DEPTH (json.loads would recurse that deep and may overflow)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return False
        elif char in "]}":
            depth -= 1
    return True


def read_job(path: str | Path, defaults: JobDefaults | None = None, limits: Limits | None = None) -> list[JobUnit]:
    """Parse and validate a job file (`.jsonl` as JSON Lines, anything else as one prompt per line) into units.

    Raises JobFileError naming the file and line for anything that cannot run (also for text that is not UTF-8,
    over-long lines and nesting deeper than 64), before any work.
    """
    path = Path(path)
    defaults = defaults or JobDefaults()
    if not path.is_file():
        raise JobFileError(f"job file {str(path)!r} does not exist")
    units: list[JobUnit] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path.name} line {number}"
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise JobFileError(
                f"{where}: not UTF-8 text (byte {exc.start + 1} of the line); "
                "a job file is .jsonl or one prompt per line"
            ) from None
        if not text or text.startswith("#"):
            continue
        if len(text) > MAX_LINE_CHARS:
            raise JobFileError(
                f"{where}: {len(text):,} characters is not allowed: expected at most {MAX_LINE_CHARS:,}"
            )
        if "\x00" in text:
            raise JobFileError(f"{where}: a NUL character is not allowed (is this a binary file?)")
        if path.suffix == ".jsonl":
            if not _json_depth_ok(text):
                raise JobFileError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels is not allowed")
            try:
                line = json.loads(text)
            except json.JSONDecodeError as exc:
                raise JobFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise JobFileError(f"{where}: JSON nested too deeply") from None
            if not isinstance(line, dict):
                raise JobFileError(f"{where}: expected a JSON object, got {type(line).__name__}")
        else:
            line = {"prompt": text}
        units.extend(_line_units(where, number, line, defaults, limits))
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


# ------------------------------------------------------------------------------------------------------- the run


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
    request = unit.request
    if request.astar is not None or request.subjects is not None or request.structured is not None:
        return None
    return repr(sorted(request.settings().items()))


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
    limits: Limits | None = None,
    context_parallel: int | None = None,
) -> JobReport:
    """Run this process's share of `units` into `out`, skipping the ones its manifests record as done.

    Without `process_index`/`num_processes` they come from accelerate's `PartialState` (one process when not
    launched), and the device defaults to that process's device. `batch_size`: prompts per pipeline call, for
    consecutive units with the same settings (each keeps its own seed's noise). `context_parallel=K`: the launch
    splits into groups of K processes; each group makes one output at a time with diffusers' context parallelism
    (video models), its first process writing it, and group g of G takes units g, g+G, ... Raises JobLockError when
    another run is writing `out`. Returns this process's `JobReport`.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed: expected an int >= 1")
    (limits or Limits.from_env()).check(batch=batch_size)
    out = Path(out)
    state = None
    if process_index is None or num_processes is None:
        from accelerate import PartialState

        state = PartialState(cpu=torch.device(parse_device(device) if device else default_device()).type == "cpu")
        process_index, num_processes = state.process_index, state.num_processes
        if device is None and state.device.type != "cpu":
            device = str(state.device)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, process_index)
    problem: Exception | None = None
    try:
        lock.acquire()
        # ranks no process of this launch owns (an earlier launch was wider): held by a live run means refused
        others = {int(m.group("rank")) for p in out.iterdir() if (m := LOCK_FILE.match(p.name))}
        busy = [r for r in others if r >= num_processes and locked_by_live_process(out, r)]
        if busy:
            raise JobLockError(f"{out} is being written by another run (lock {out / f'.lock-rank{busy[0]}'})")
    except JobLockError as exc:
        problem = exc
    if not all_ranks_agree(problem is None, state):
        lock.release()
        raise problem or JobLockError(f"{out} is being written by another run (another process of this launch says)")
    groups = None
    if context_parallel is not None:
        check_int_range("context_parallel", context_parallel, 2)
        if state is None or num_processes % context_parallel:
            raise ValueError(
                f"context_parallel={context_parallel} is not allowed: it needs a launch (torchrun/accelerate) of a "
                f"multiple of {context_parallel} processes, this one has {num_processes}"
            )
        groups = context_parallel
    try:
        return _run_locked(units, out, process_index, num_processes, device, torch_dtype, batch_size, limits, state,
                           groups)  # fmt: skip
    finally:
        lock.release()


def _run_locked(units, out, process_index, num_processes, device, torch_dtype, batch_size, limits, state,
                context_parallel=None) -> JobReport:  # fmt: skip
    own = {process_index}
    existing = {
        int(m.group("rank")) for p in out.iterdir() if (m := RANK_FILE.match(p.name) or TEMP_FILE.match(p.name))
    }
    # This process recovers its own rank and, on rank 0, ranks no process of this launch owns (a wider earlier run).
    recover(out, own | ({r for r in existing if r >= num_processes} if process_index == 0 else set()))
    if state is not None:
        state.wait_for_everyone()  # every rank has recovered before any reads the others' manifests
    done = read_manifests(out)
    for unit in units:  # a folder holding another job's outputs under the same names is refused, before any work
        record = done.get(unit.name)
        if record is not None and record.get("spec") != unit.spec:
            raise JobFileError(
                f"{out} already holds {unit.name!r} made with other settings ({record.get('spec')}); use a new --out"
            )
    claimed = {n for record in done.values() for n in record.get("files", [])}
    writer, mesh, parallel_ready = True, None, set()
    if context_parallel:  # groups of K processes: group g of G takes units g, g+G, ...; its first process writes
        from .parallel import group_mesh

        mesh = group_mesh(context_parallel)
        writer = process_index % context_parallel == 0
        mine = shard(units, process_index // context_parallel, num_processes // context_parallel)
    else:
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
        committed = 0
        try:
            pipe = cached_pipeline(first.model, torch_dtype, device)
            pipe.set_progress_bar_config(disable=True)  # the job's bar is the progress; one per call would flood
            if mesh is not None and id(pipe) not in parallel_ready:
                from .parallel import enable_context_parallel

                enable_context_parallel(pipe, context_parallel, mesh=mesh)
                parallel_ready.add(id(pipe))
            results = generate_batch([u.request for u in group], pipe=pipe, limits=limits)
            for unit, result in zip(group, results):
                record = {
                    "name": unit.name,
                    "prompt": unit.prompt,
                    "seed": unit.seed,
                    "seconds": round(result.seconds, 4),
                    "batch": len(group),
                    "process": process_index,
                    "spec": unit.spec,
                    "request": unit.request.to_dict(),
                    "device": result.device,
                    "dtype": result.dtype,
                }
                if result.radial_density is not None:  # the block density radial attention's sparse steps ran at
                    record["radial_density"] = round(result.radial_density, 6)
                if result.notes:  # what the model did not take as asked (a prompt cut short, a radial run all dense)
                    record["notes"] = result.notes
                if writer:  # in a context-parallel group every process made the output; the first writes it
                    commit_unit(out, process_index, manifest, record, result, claimed)
                report.generated.append(unit.name)
                committed += 1
                fault("unit-done")
        except Exception as exc:  # one bad call (out of memory, a model that does not load) must not stop the job
            logger.exception("units %s failed", [u.name for u in group[committed:]])
            for unit in group[committed:]:
                error = {"name": unit.name, "error": f"{type(exc).__name__}: {exc}", "time": time.time()}
                append_record(failures, error)
                report.failed.append(unit.name)
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
