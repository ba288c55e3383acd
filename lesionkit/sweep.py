"""Sweeps: one base recipe, a grid and/or a list of overrides, one run folder per combination.

A sweep file (YAML):

    name: study               # the sweep's folder name and W&B group (default: the file's stem)
    base: resnet18            # recipe name or YAML path (relative to this file) (default: the defaults)
    set: {epochs: 25}         # sweep-wide settings over the base
    grid:                     # the cartesian product of its axes, in this order
      seed: [0, 1]            #   a config key: one value per run
      optim:                  #   or options that set several keys together (`name` names the option)
        - {name: sgd_step, optimizer: sgd, scheduler: step}
        - {name: adam_plateau, optimizer: adam, scheduler: plateau}
    runs:                     # explicit runs after the grid's, each its own overrides over the base
      - {name: lite0, model: efficientnet_lite0, pretrained: true}

Each run's config is base recipe < `set` < its overrides < the sweep-wide flags of `lesionkit sweep`; values
set by the sweep also win over the base's `profiles:` section for them. Every key and value is checked
against `TrainConfig` (for both hardware profiles) before anything runs; a bad one is one line and exit 2.

A run's name comes from its overrides in order: an option's `name`, else one token per key: a string value
itself (`alexnet`), a flag as `key` / `no_key`, a number as `key` + value (`seed0`), other values as `key` + a
short digest; joined by `-` (no overrides: `base`). Names are unique in a sweep (else an error says so).
W&B: the sweep's name is every run's group, each override a `key=value` tag, the run name its run_name.

The sweep folder OUT holds `sweep.json` (the plan: each run's index, name, overrides and full recipe),
`recipes/NAME.yaml` (what each run trains with) and one run folder per run, `OUT/NAME`, all written
atomically before any run starts, so a Slurm array task reads its run by index (`task`). A run is finished
when its `status.json` says `completed`; `--local` and `--slurm` skip finished runs and resume the others
from their `last/`, so rerunning the same command continues a sweep. A different plan in the same OUT is
refused. `lesionkit compare OUT` then lists the runs side by side.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from lesionkit import profiles, sources
from lesionkit.atomic import write_json, write_text
from lesionkit.config import TrainConfig, apply_overrides, load_recipe, validate
from lesionkit.errors import ConfigError, RunError, UsageError

PLAN = "sweep.json"
RECIPES = "recipes"
LOGS = "logs"
KEYS = ("name", "base", "set", "grid", "runs")
FORMAT = 1
JOB_SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "sweep.sh"
CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
MAPPING_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.type in (dict, "dict"))
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


@dataclasses.dataclass
class Run:
    index: int
    name: str
    overrides: dict  # the run's own keys over the base (and `set`)
    recipe: dict  # the full recipe it trains with (base keys, its profiles section, the sweep's keys)

    @property
    def needs_weights(self) -> bool:
        """Pretrained torchvision weights: internet, or a weights cache (lite0's come with its package)."""
        return bool(self.recipe.get("pretrained")) and self.recipe.get("model") != "efficientnet_lite0"

    def to_json(self) -> dict:
        return {"index": self.index, "name": self.name, "overrides": self.overrides, "recipe": self.recipe}


@dataclasses.dataclass
class Sweep:
    name: str
    source: str  # the sweep file
    runs: list[Run]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "source": self.source,
            "runs": [r.to_json() for r in self.runs],
        }


# ------------------------------------------------------------------------------------ names


def token(key: str, value) -> str:
    if isinstance(value, bool):
        return key if value else f"no_{key}"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return f"{key}{value}"
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]
    return f"{key}{digest}"


def safe(text: str) -> str:
    return _UNSAFE.sub("_", str(text)).strip("._") or "_"


def run_name(parts: list[tuple[str | None, dict]]) -> str:
    """The readable name of a run from its overrides: (option name or None, keys) in sweep order."""
    tokens = []
    for label, keys in parts:
        tokens += [safe(label)] if label else [safe(token(k, v)) for k, v in keys.items()]
    return "-".join(tokens) or "base"


# ------------------------------------------------------------------------------------ expansion


def _option(axis: str, value, source: str) -> tuple[str | None, dict]:
    """One option of a grid axis (or one `runs:` entry when `axis` is None): (its name, its keys)."""
    if axis in CONFIG_KEYS and not (isinstance(value, dict) and axis not in MAPPING_KEYS):
        return None, {axis: value}
    if not isinstance(value, dict) or not value:
        if axis is None:
            raise ConfigError(f"{source}: runs: each run is a mapping of config keys, got {value!r}")
        close = difflib.get_close_matches(axis, CONFIG_KEYS, n=1)
        raise ConfigError(
            f"{source}: grid.{axis}: not a config key{f' (did you mean {close[0]}?)' if close else ''}; "
            f"an axis of options that set several keys takes mappings of config keys, got {value!r}"
        )
    keys = dict(value)
    name = keys.pop("name", None)
    return (None if name is None else str(name)), keys


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(unknown)}; valid: {', '.join(KEYS)}")
    if not spec.get("grid") and not spec.get("runs"):
        raise ConfigError(f"{path}: a sweep needs a `grid`, a `runs` list, or both")
    return spec


def _base(spec: dict, path: Path) -> dict:
    base = spec.get("base")
    if base is None:
        return {}
    candidate = path.parent / str(base)
    local = candidate.suffix in (".yaml", ".yml") and candidate.exists()
    return load_recipe(str(candidate) if local else str(base))


def _absolute(folders) -> list[str]:
    folders = [folders] if isinstance(folders, str) else list(folders or [])
    return [p if sources.is_remote(p) else str(Path(p).absolute()) for p in map(str, folders)]


def recipe_of(base: dict, layers: list[dict]) -> dict:
    """base < each layer; keys set by the layers are dropped from the base's profiles sections."""
    merged, sections = {k: v for k, v in base.items() if k != "profiles"}, dict(base.get("profiles") or {})
    for layer in layers:
        merged.update(layer)
    swept = {k for layer in layers for k in layer}
    if isinstance(sections, dict):
        sections = {p: {k: v for k, v in (s or {}).items() if k not in swept} for p, s in sections.items()}
        sections = {p: s for p, s in sections.items() if s}
    for key in ("train", "val"):
        if merged.get(key):
            merged[key] = _absolute(merged[key])
    return {**merged, **({"profiles": sections} if sections else {})}


def check(run: Run, source: str) -> None:
    """The run's config as each hardware profile would resolve it: every key known, every value valid."""
    where = f"{source}: run {run.name}"
    for profile in profiles.PROFILES:
        cfg = TrainConfig()
        try:
            for layer, values in profiles.layers(run.recipe, profile, where):
                cfg = apply_overrides(cfg, values, source=layer)
            validate(dataclasses.replace(cfg, profile=profile))
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def expand(path: str | Path, flags: dict | None = None, name: str | None = None) -> Sweep:
    """The runs of sweep file `path` (grid product, then `runs:`), each with its full recipe, checked."""
    path, flags = Path(path), dict(flags or {})
    spec, source = load(path), str(path)
    base, wide = _base(spec, path), spec.get("set") or {}
    if not isinstance(wide, dict):
        raise ConfigError(f"{source}: `set` must be a mapping of config keys, got {wide!r}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{source}: `grid` maps config keys (or labels) to lists of options")
    axes = []
    for axis, options in grid.items():
        if not isinstance(options, list) or not options:
            raise ConfigError(f"{source}: grid.{axis}: expected a non-empty list of options, got {options!r}")
        axes.append([_option(str(axis), o, source) for o in options])
    combos = [list(c) for c in itertools.product(*axes)] if axes else []
    listed = spec.get("runs") or []
    if not isinstance(listed, list):
        raise ConfigError(f"{source}: `runs` must be a list of mappings of config keys")
    combos += [[_option(None, r, source)] for r in listed]
    sweep_name = safe(name or spec.get("name") or path.stem)
    runs, seen = [], {}
    for index, parts in enumerate(combos):
        overrides = {k: v for _, keys in parts for k, v in keys.items()}
        label = run_name(parts)
        if label in seen or label == RECIPES or label == LOGS:
            raise ConfigError(
                f"{source}: runs {seen.get(label, label)} and {index} are both named {label!r}: give the "
                "options distinct `name`s"
            )
        seen[label] = index
        tags = ",".join(f"{k}={v}"[:64] for k, v in overrides.items())
        wandb = {"wandb_group": sweep_name, "wandb_tags": tags, "run_name": label}
        recipe = recipe_of(base, [wide, overrides, wandb, flags])
        run = Run(index, label, overrides, recipe)
        check(run, source)
        runs.append(run)
    return Sweep(sweep_name, str(path.absolute()), runs)


# ------------------------------------------------------------------------------------ the sweep folder


def run_dir(out: Path, run: Run) -> Path:
    return Path(out) / run.name


def recipe_path(out: Path, run: Run) -> Path:
    return Path(out) / RECIPES / f"{run.name}.yaml"


def status(folder: Path) -> str:
    """The run's status.json status (`completed`, `preempted`, ...), or `-` before its first record."""
    path = Path(folder) / "status.json"
    try:
        return str(json.loads(path.read_text()).get("status", "-"))
    except (OSError, ValueError):
        return "-"


def finished(folder: Path) -> bool:
    return status(folder) == "completed"


def write_plan(sweep: Sweep, out: Path) -> None:
    """sweep.json and each run's recipe, atomically; a different plan already in `out` is refused."""
    out = Path(out)
    plan = json.loads(json.dumps(sweep.to_json()))
    if (out / PLAN).is_file():
        old = json.loads((out / PLAN).read_text())
        if old.get("runs") != plan["runs"]:
            differ = [r["name"] for r in plan["runs"] if r not in old.get("runs", [])]
            raise UsageError(
                f"{out} holds another sweep's plan ({PLAN}; differs in {', '.join(differ[:3]) or 'its runs'})"
                ": pass another --out, or the same sweep file and flags to continue it"
            )
    for run in sweep.runs:
        write_text(recipe_path(out, run), yaml.safe_dump(run.recipe, sort_keys=False))
    write_json(out / PLAN, plan)


def read_plan(out: Path) -> Sweep:
    path = Path(out) / PLAN
    if not path.is_file():
        raise UsageError(f"{out}: no {PLAN} there (plan a sweep with `lesionkit sweep SWEEP.yaml`)")
    plan = json.loads(path.read_text())
    runs = [Run(r["index"], r["name"], r["overrides"], r["recipe"]) for r in plan["runs"]]
    return Sweep(plan["name"], plan["source"], runs)


def check_data(sweep: Sweep) -> None:
    """What training would refuse (models, presets, data folders, monitors), before any run starts."""
    from lesionkit.train import check_config

    for run in sweep.runs:
        if not run.recipe.get("train"):
            raise UsageError(
                f"run {run.name} has no training data: pass --train DIR (and --val DIR) to the sweep, or set "
                "them in its `set:`"
            )
        cfg = TrainConfig()
        for layer, values in profiles.layers(run.recipe, "cpu", run.name):
            cfg = apply_overrides(cfg, values, source=layer)
        try:
            check_config(dataclasses.replace(cfg, profile="cpu", resume=False))
        except ConfigError as e:
            raise ConfigError(f"run {run.name}: {e}") from None


def table(sweep: Sweep, out: Path) -> str:
    """The `--dry-run` listing: one line per run, then what the pretrained runs need."""
    rows = [("#", "run", "status", "weights", "overrides")]
    for run in sweep.runs:
        over = " ".join(f"{k}={v}" for k, v in run.overrides.items())
        weights = "yes" if run.needs_weights else "-"
        rows.append((str(run.index), run.name, status(run_dir(out, run)), weights, over))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows]
    need = [r.name for r in sweep.runs if r.needs_weights]
    done = sum(finished(run_dir(out, r)) for r in sweep.runs)
    lines.append(f"lesionkit sweep: {len(sweep.runs)} runs in {out}/ ({done} finished)")
    if need:
        lines.append(
            f"lesionkit sweep: {len(need)} run(s) start from pretrained torchvision weights (weights: yes): "
            "they need internet, or `lesionkit weights fetch MODEL... --weights-cache DIR` and the same "
            "--weights-cache DIR here"
        )
    return "\n".join(lines)


def train_command(out: Path, run: Run, launcher: list[str] | None = None) -> list[str]:
    from lesionkit import train as train_module

    recipe, folder = str(recipe_path(out, run)), str(run_dir(out, run))
    launch = launcher or [sys.executable]
    return [*launch, train_module.__file__, "--config", recipe, "--output-dir", folder, "--resume"]


def run_local(sweep: Sweep, out: Path, launcher: list[str] | None = None) -> list[str]:
    """Train the unfinished runs one after another; returns the names of those that failed."""
    failed = []
    for run in sweep.runs:
        head = f"lesionkit sweep: [{run.index + 1}/{len(sweep.runs)}] {run.name}"
        if finished(run_dir(out, run)):
            print(f"{head}: finished, skipped", flush=True)
            continue
        cmd = train_command(out, run, launcher)
        print(f"{head}: {shlex.join(cmd)}", flush=True)
        code = subprocess.run(cmd, check=False).returncode
        if code != 0:
            print(f"{head}: failed (exit {code})", flush=True)
            failed.append(run.name)
    return failed


def submit(sweep: Sweep, out: Path, throttle: int = 0, sbatch_args: list[str] | None = None) -> str | None:
    """One Slurm job array over the unfinished runs (`jobs/sweep.sh`); returns the job id (None: all done)."""
    todo = [r.index for r in sweep.runs if not finished(run_dir(out, r))]
    if not todo:
        return None
    if not JOB_SCRIPT.is_file():
        raise UsageError(f"{JOB_SCRIPT}: the sweep's job script is missing (run from a lesionkit checkout)")
    (Path(out) / LOGS).mkdir(parents=True, exist_ok=True)
    array = ",".join(map(str, todo)) + (f"%{throttle}" if throttle else "")
    cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name=lk-sweep-{sweep.name}"]
    cmd += [f"--output={Path(out).absolute() / LOGS}/%x-%A_%a.out", *(sbatch_args or []), str(JOB_SCRIPT)]
    print(f"lesionkit sweep: {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, LK_SWEEP=str(Path(out).absolute()))
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RunError("sbatch not found: --slurm needs a Slurm login node (or --local)") from None
    if proc.returncode != 0:
        raise RunError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def task_env(out: Path, index: int) -> str:
    """Shell assignments for array task `index` (`jobs/sweep.sh` evals them and sources _launch.sh)."""
    sweep = read_plan(out)
    if not 0 <= index < len(sweep.runs):
        raise UsageError(f"--task {index}: the sweep in {out} has runs 0..{len(sweep.runs) - 1}")
    run = sweep.runs[index]
    values = {
        "LK_SWEEP_RUN": run.name,
        "LK_SWEEP_FINISHED": "1" if finished(run_dir(out, run)) else "0",
        "LK_RECIPE": str(recipe_path(out, run).absolute()),
        "LK_OUTPUT": str(run_dir(out, run).absolute()),
    }
    for key in ("train", "val"):  # else _launch.sh's defaults
        if run.recipe.get(key):
            values[f"LK_{key.upper()}"] = " ".join(run.recipe[key])
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
