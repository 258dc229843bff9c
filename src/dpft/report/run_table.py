"""`dpft-sweep <name | path.yaml>`: run a table's grid (`sweeps/<name>.yaml`), skipping finished cells, then
build its report. The sweep file's format is described in `dpft.report.sweeps`."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from dpft.config import CONFIG_DIR
from dpft.report.collect import report
from dpft.report.sweeps import LAUNCHERS, SWEEPS_DIR, commands, jobs, load_sweep, restrict, search_keys
from dpft.usage import tables_help


def wandb_settings(sweep: dict[str, Any], extra: list[str] | None = None) -> dict[str, Any] | None:
    """Where the sweep's jobs log to W&B (project, entity, offline), read from their composed config;
    None when they log elsewhere (logger=csv or none)."""
    from hydra import compose, initialize_config_dir

    job = jobs(sweep)[0]
    overrides = [f"{k}={v}" for k, v in job.items()] + [o for o in extra or [] if not o.startswith("hydra")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    logger = cfg.get("logger") or {}
    if not str(logger.get("_target_", "")).endswith("WandbLogger"):
        return None
    return {"project": logger.project, "entity": logger.entity, "offline": bool(logger.offline)}


def run_commands(cmds: list[list[str]], parallel: bool) -> int:
    """Run the multiruns (all at once for Slurm: each submits its jobs and waits); the number that failed."""
    for cmd in cmds:
        print(" ".join(cmd[1:]), flush=True)
    if parallel:
        processes = [subprocess.Popen(cmd) for cmd in cmds]
        return sum(p.wait() != 0 for p in processes)
    return sum(subprocess.run(cmd).returncode != 0 for cmd in cmds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpft-sweep", description=__doc__, epilog=tables_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help=f"a sweep name in {SWEEPS_DIR} or the path of a sweep file")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every job, e.g. hydra.launcher.n_jobs=4")
    parser.add_argument("--launcher", default=os.environ.get("LAUNCHER") or "basic", choices=list(LAUNCHERS),
                        help="basic: one job after another; joblib: N local processes (hydra.launcher.n_jobs=N); "
                             "slurm, slurm_multigpu: Slurm jobs (conf/local/default.yaml), default $LAUNCHER or basic")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and the commands, run nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace a grid key's values (--set task.data_seed=42), run some methods or privacy "
                             "options only (--set method=dpzero), or search a key over given values")
    parser.add_argument("--search", nargs="*", default=None, metavar="KEY",
                        help="run the papers' search grids (all, or the keys named) instead of the chosen values")
    args = parser.parse_intermixed_args(argv)
    try:
        sweep = load_sweep(args.table)
        search = args.search
        for item in args.set:
            search = restrict(sweep, item, search)
    except ValueError as err:  # a user's mistake: the message, not a traceback
        sys.exit(f"dpft-sweep: {err}")
    if search == []:
        search = search_keys(sweep)
    log_dir = os.environ.get("DPFT_LOG_DIR", "logs")
    cmds = commands(sweep, args.launcher, log_dir, search, args.overrides)
    print(f"table {sweep['table']}: {len(jobs(sweep, search))} jobs in {len(cmds)} multiruns")
    if args.dry_run:  # commands a shell can run as printed
        for cmd in cmds:
            print(shlex.join(["dpft-train", *cmd[3:]]))
        return
    failures = run_commands(cmds, parallel=args.launcher.startswith("slurm"))
    folder = Path(log_dir) / "tables" / sweep["table"]
    result = report(folder, sweep=sweep, log_wandb=wandb_settings(sweep, args.overrides))
    print(result.markdown())
    print(f"report: {folder}/table.md (also .csv, .tex); plot: {folder}/privacy_utility.png"
          + (f" ({failures} of {len(cmds)} multiruns failed)" if failures else ""))
    if failures:  # the report is written; the exit status says the table is incomplete (run again to resume)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
