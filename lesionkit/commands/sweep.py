"""`lesionkit sweep SWEEP.yaml (--dry-run | --local | --slurm)`: a base recipe, a grid and/or a list of
overrides, one run folder each under the sweep's folder (`lesionkit.sweep`). Rerun to continue: finished
runs are skipped. `lesionkit sweep OUT --task K` prints array task K's run for `jobs/sweep.sh`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from lesionkit import runs
from lesionkit import sweep as S
from lesionkit.config import add_config_flags, flags_given
from lesionkit.errors import RunError, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sweep", metavar="SWEEP", help="sweep file (YAML), or a sweep folder planned before (its sweep.json)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list the runs and their status (default)")
    mode.add_argument("--local", action="store_true", help="train the unfinished runs here, one by one")
    mode.add_argument("--slurm", action="store_true", help="submit one job array (jobs/sweep.sh) of them")
    # jobs/sweep.sh: print array task K's run settings for the shell
    mode.add_argument("--task", type=int, metavar="K", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", metavar="DIR", help="the sweep's folder (default: runs/NAME, NAME from the sweep file)"
    )
    parser.add_argument(
        "--throttle", type=int, default=0, metavar="N", help="--slurm: at most N array tasks at once (%%N)"
    )
    parser.add_argument(
        "--sbatch",
        default="",
        metavar="ARGS",
        help="--slurm: more sbatch options, e.g. --sbatch='--partition gpu --gpus-per-node=1'",
    )
    parser.add_argument(
        "--launcher",
        default="",
        help="--local: command that starts each training, e.g. 'accelerate launch --config_file "
        "accelerate_configs/multi_gpu.yaml' (default: this python, one process)",
    )
    group = parser.add_argument_group("sweep-wide settings, over every run's overrides (`train` flags)")
    add_config_flags(group, recipe=False)


def run(args: argparse.Namespace) -> int:
    if args.throttle < 0:
        raise UsageError("--throttle must be >= 0")
    flags, source = flags_given(args), Path(args.sweep)
    if source.is_dir():
        if flags:
            raise UsageError(f"{source} is a planned sweep: settings go with its sweep file, not its folder")
        if args.out and Path(args.out).resolve() != source.resolve():
            raise UsageError(f"{source} is a sweep folder already: drop --out")
        out, sweep = source, S.read_plan(source)
    else:
        sweep = S.expand(source, flags)
        out = Path(args.out) if args.out else runs.ROOT / sweep.name
    if args.task is not None:
        print(S.task_env(out, args.task), end="")
        return 0
    if not (args.local or args.slurm):
        print(S.table(sweep, out))
        return 0
    S.check_data(sweep)
    S.write_plan(sweep, out)
    if args.slurm:
        job = S.submit(sweep, out, args.throttle, shlex.split(args.sbatch))
        if job is None:
            print(f"lesionkit sweep: all {len(sweep.runs)} runs in {out}/ are finished; nothing submitted")
        else:
            print(f"lesionkit sweep: job array {job}, logs in {out}/{S.LOGS}/; then: lesionkit compare {out}")
        return 0
    failed = S.run_local(sweep, out, shlex.split(args.launcher) or None)
    if failed:
        raise RunError(
            f"{len(failed)} of {len(sweep.runs)} runs failed ({', '.join(failed)}); fix the cause and rerun "
            "the same command to continue"
        )
    print(f"lesionkit sweep: {len(sweep.runs)} runs finished in {out}/; then: lesionkit compare {out}")
    return 0
