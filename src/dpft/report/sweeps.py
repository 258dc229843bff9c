"""Table sweeps (`sweeps/<name>.yaml`) and `dpft-sweep <name>`: run a table's grid, skipping finished cells.

A sweep file holds `fixed` overrides for every job, a `grid` (key -> values, Cartesian product),
`arms` (method + the privacy options it runs under + its own overrides) and `reference` values
from the papers, each with its source. Jobs land in `logs/tables/<name>/<overrides>/`; a job whose
`results.json` says completed is skipped (`skip_existing=true`), so re-running resumes a sweep.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpft.config import CONFIG_DIR

SWEEPS_DIR = CONFIG_DIR.parent / "sweeps"
LAUNCHERS = ("basic", "joblib", "slurm")


def load_sweep(name: str) -> dict[str, Any]:
    path = SWEEPS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
        raise ValueError(f"unknown table {name!r}; the sweeps are: {', '.join(names)}")
    sweep = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    sweep.setdefault("table", name)
    return sweep


def privacy_epsilon(option: str) -> float:
    return float(OmegaConf.load(CONFIG_DIR / "privacy" / f"{option}.yaml").target_epsilon)


def _split(override: str) -> tuple[str, str]:
    key, value = override.split("=", 1)
    return key, value


def jobs(sweep: dict[str, Any]) -> list[dict[str, str]]:
    """Every job as {key: value} overrides (plus `task`, `model`, `method`, `privacy`)."""
    fixed = dict(_split(o) for o in sweep.get("fixed", []))
    grid = sweep.get("grid", {})
    keys = list(grid)
    out = []
    for arm in sweep["arms"]:
        arm_fixed = dict(_split(o) for o in arm.get("overrides", []))
        for privacy in arm.get("privacy", ["none"]):
            for values in itertools.product(*(grid[k] for k in keys)):
                job = {**fixed, **dict(zip(keys, map(str, values))), "method": arm["method"], "privacy": privacy,
                       **arm_fixed}
                out.append(job)
    return out


def commands(sweep: dict[str, Any], launcher: str = "basic", log_dir: str = "logs") -> list[list[str]]:
    """One `dpft-train --multirun` per (arm, privacy), the grid as comma lists."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"LAUNCHER={launcher!r} is not one of {LAUNCHERS}")
    name = sweep["table"]
    grid = {k: ",".join(map(str, v)) for k, v in sweep.get("grid", {}).items()}
    out = []
    for arm in sweep["arms"]:
        for privacy in arm.get("privacy", ["none"]):
            cmd = [sys.executable, "-m", "dpft.train", "--multirun", *sweep.get("fixed", []),
                   f"method={arm['method']}", f"privacy={privacy}", *arm.get("overrides", []),
                   *(f"{k}={v}" for k, v in grid.items()),
                   f"hydra.sweep.dir={log_dir}/tables/{name}", "skip_existing=true", f"tags=[{name}]"]
            if launcher != "basic":
                cmd.append(f"hydra/launcher={'submitit_slurm' if launcher == 'slurm' else 'joblib'}")
            out.append(cmd)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table")
    parser.add_argument("--launcher", default=os.environ.get("LAUNCHER") or "basic", choices=LAUNCHERS)
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and the commands, run nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace a grid dimension, e.g. --set task.data_seed=42 for one data seed")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.table)
    for item in args.set:
        key, values = _split(item)
        if key not in sweep.get("grid", {}):
            raise ValueError(f"--set {key}: not a grid dimension of {args.table} ({sorted(sweep.get('grid', {}))})")
        sweep["grid"][key] = values.split(",")
    log_dir = os.environ.get("DPFT_LOG_DIR", "logs")
    print(f"table {sweep['table']}: {len(jobs(sweep))} jobs")
    failures = 0
    for cmd in commands(sweep, args.launcher, log_dir):
        print(" ".join(cmd[1:]), flush=True)
        if not args.dry_run:
            failures += subprocess.run(cmd).returncode != 0
    if not args.dry_run:
        from dpft.report.collect import report

        report(Path(log_dir) / "tables" / sweep["table"], table=sweep["table"])
        print(f"report: {log_dir}/tables/{sweep['table']}/table.md" + (f" ({failures} commands failed)" if failures
                                                                        else ""))


if __name__ == "__main__":
    main()
