"""Table sweeps (`sweeps/<name>.yaml`): reading and checking a sweep file, its jobs and the multirun
commands that run them (`dpft-sweep`, in `dpft.report.run_table`, runs them and builds the report).

A sweep file holds:
  fixed:      overrides for every job
  grid:       key -> values (Cartesian product)
  arms:       method + the privacy options it runs under + its own overrides (the papers' chosen values);
              `name:` labels a variant of a method (it sets method.name, the report's method column), so
              one method can run as several arms, e.g. DR-Encoder at several compression ratios; `only:`
              {grid key: [values]} runs the arm on those values of the grid only (e.g. DP-SGD on the models
              where it fits)
  when:       "key=value" -> overrides that go with that value of a grid key, method or privacy
              (e.g. a per-task δ = 1/n)
  search:     method -> {key: values}: the grid a paper searched; off by default (the arm's chosen value
              runs), `--search [KEY ...]` or `--set KEY=V1,V2` runs it, and the report keeps per cell the
              values with the best mean validation metric
  selection:  how the arms' values were chosen, and on what data (the report prints it): a choice made
              on private runs is not in their per-run ε; `--search` runs and the report charges it
  compare:    [{method, baseline, baseline_epsilon?}]: the report shows method - baseline per cell
  reference:  the papers' values [{task, model, method, epsilon, value, source?}] (with `baseline:` a
              paper's method - baseline difference), `reference_source` the default source,
              `reference_convention` (or a reference's `convention`) the privacy convention its values were
              obtained under (ours | paper): the report marks ‡ where a cell's private runs used another
Jobs land in `logs/tables/<name>/<overrides>/`; a job whose `results.json` says completed is skipped
(`skip_existing=true`), so re-running resumes a sweep.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dpft.config import CONFIG_DIR
from dpft.privacy.accounting import CONVENTIONS

SWEEPS_DIR = CONFIG_DIR.parent / "sweeps"
# LAUNCHER -> conf/hydra/launcher/<config> (None: Hydra's basic launcher, one job after another)
LAUNCHERS = {"basic": None, "joblib": "parallel", "slurm": "slurm", "slurm_multigpu": "slurm_multigpu"}
SWEEP_KEYS = ("table", "description", "fixed", "grid", "arms", "when", "search", "selection", "compare",
              "reference_source", "reference_convention", "reference")
REFERENCE_KEYS = ("task", "model", "method", "epsilon", "value")
ARM_KEYS = ("method", "name", "privacy", "overrides", "only")


def config_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def load_sweep(name: str | Path) -> dict[str, Any]:
    """A sweep by name (`sweeps/<name>.yaml`) or by path (`path/to/table.yaml`), checked."""
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else SWEEPS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown table {str(name)!r}: give a sweep file's path or one of: "
                         f"{', '.join(p.stem for p in sorted(SWEEPS_DIR.glob('*.yaml')))}")
    sweep = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    sweep.setdefault("table", path.stem)
    check_sweep(sweep, path)
    return sweep


def _fail(where: Path | str, message: str) -> None:
    raise ValueError(f"{where}: {message}")


def check_sweep(sweep: dict[str, Any], where: Path | str) -> None:
    """Clear errors for a sweep file's mistakes, naming the key and the valid values."""
    if unknown := sorted(set(sweep) - set(SWEEP_KEYS)):
        _fail(where, f"unknown keys {unknown}; a sweep has {list(SWEEP_KEYS)}")
    methods, privacy = config_options("method"), config_options("privacy")
    if not sweep.get("arms"):
        _fail(where, "arms: list at least one {method: ..., privacy: [...], overrides: [...]}")
    grid = sweep.get("grid") or {}
    for arm in sweep["arms"]:
        if unknown := sorted(set(arm) - set(ARM_KEYS)):
            _fail(where, f"arms: {unknown} (method {arm.get('method')}) unknown; an arm has {list(ARM_KEYS)}")
        if arm.get("method") not in methods:
            _fail(where, f"arms: method={arm.get('method')!r} is not one of {methods}")
        for key, values in (arm.get("only") or {}).items():
            if key not in grid or not isinstance(values, list) or not values or not set(_strs(values)) <= set(
                    _strs(grid[key])):
                _fail(where, f"arms: only.{key}={values} (method {arm['method']}) must be a non-empty subset of "
                             f"grid.{key}={grid.get(key)}")
        for option in arm.get("privacy", ["none"]):
            if option not in privacy:
                _fail(where, f"arms: privacy={option!r} (method {arm['method']}) is not one of {privacy}")
    arm_methods = [arm_name(arm) for arm in sweep["arms"]]
    if len(set(arm_methods)) < len(arm_methods):
        _fail(where, f"arms: {arm_methods} repeat a method; give the variants a `name:` each")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            _fail(where, f"grid.{key}: give a non-empty list of values")
    fixed_keys = {o.split("=", 1)[0] for o in sweep.get("fixed", [])}
    if both := sorted(fixed_keys & set(grid)):
        _fail(where, f"{both} are both fixed and grid keys")
    for condition in sweep.get("when") or {}:
        key = condition.split("=", 1)[0]
        if "=" not in condition or key not in {*grid, *fixed_keys, "method", "privacy"}:
            _fail(where, f"when: {condition!r} must be key=value with key a grid key, a fixed key, method or privacy")
    for method, dims in (sweep.get("search") or {}).items():
        if method not in arm_methods:
            _fail(where, f"search.{method}: not a method of the arms {arm_methods}")
        chosen = [_overrides(a.get("overrides", [])) for a in sweep["arms"] if arm_name(a) == method]
        for key, values in dims.items():
            if not isinstance(values, list) or not values:
                _fail(where, f"search.{method}.{key}: give a non-empty list of values")
            if any(key not in c for c in chosen):  # else its runs are named apart from the searched ones
                _fail(where, f"search.{method}.{key}: the arm must set its chosen value in its overrides "
                             f"(e.g. {key}={values[0]})")
    if "selection" in sweep and not (isinstance(sweep["selection"], str) and sweep["selection"].strip()):
        _fail(where, f"selection: {sweep['selection']!r} should be a sentence saying how the arms' values were "
                     "chosen (e.g. 'the paper's values, chosen on public data')")
    for spec in sweep.get("compare") or []:
        for role in ("method", "baseline"):
            if spec.get(role) not in arm_methods:
                _fail(where, f"compare: {role}={spec.get(role)!r} is not a method of the arms {arm_methods}")
    for ref in sweep.get("reference") or []:
        if missing := [k for k in REFERENCE_KEYS if k not in ref]:
            _fail(where, f"reference {ref}: missing {missing}")
        if not ref.get("source", sweep.get("reference_source")):
            _fail(where, f"reference {ref}: give its source (or a reference_source for the file)")
        if ref.get("convention", sweep.get("reference_convention")) not in (None, *CONVENTIONS):
            _fail(where, f"reference {ref}: its convention must be one of {CONVENTIONS}")


def arm_name(arm: dict[str, Any]) -> str:
    """The method's name in results and reports: the arm's `name`, else the method config's."""
    return arm.get("name", arm["method"])


def job_method(job: dict[str, str]) -> str:
    return job.get("method.name", job["method"])


def privacy_epsilon(option: str) -> float:
    return float(OmegaConf.load(CONFIG_DIR / "privacy" / f"{option}.yaml").target_epsilon)


def _overrides(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def _strs(values: list[Any]) -> list[str]:
    return [str(v) for v in values]


def _same(text: str, value: Any) -> bool:
    try:
        return float(text) == float(value)
    except ValueError:
        return text == str(value)


@dataclass
class Block:
    """One `dpft-train --multirun`: single-valued overrides and swept keys (comma lists)."""

    overrides: dict[str, str]
    dims: dict[str, list[str]]

    def jobs(self) -> list[dict[str, str]]:
        keys = list(self.dims)
        return [{**self.overrides, **dict(zip(keys, values))}
                for values in itertools.product(*(self.dims[k] for k in keys))]


def search_keys(sweep: dict[str, Any]) -> list[str]:
    return sorted({key for dims in (sweep.get("search") or {}).values() for key in dims})


def blocks(sweep: dict[str, Any], search: list[str] | None = None) -> list[Block]:
    """The sweep as multirun blocks: arms with the same overrides and privacy options share one; `search`
    names the searched keys to expand (None: the arms' chosen values only)."""
    fixed = _overrides(sweep.get("fixed", []))
    grid = {key: _strs(values) for key, values in (sweep.get("grid") or {}).items()}
    merged: dict[tuple, list[str]] = {}
    for arm in sweep["arms"]:
        overrides = _overrides(arm.get("overrides", [])) | ({"method.name": arm["name"]} if "name" in arm else {})
        dims = {"privacy": _strs(arm.get("privacy", ["none"]))}
        for key, values in (sweep.get("search") or {}).get(arm_name(arm), {}).items():
            if search is not None and key in search:
                chosen = overrides.pop(key, None)  # spelled as the arm does, so its finished runs are reused
                dims[key] = [chosen if chosen is not None and _same(chosen, v) else str(v) for v in values]
        only = {k: [v for v in grid[k] if v in _strs(values)] for k, values in (arm.get("only") or {}).items()}
        own = {**grid, **only}
        signature = (tuple(overrides.items()), tuple((k, tuple(v)) for k, v in {**own, **dims}.items()))
        merged.setdefault(signature, []).append(arm["method"])
    out = []
    for (overrides, dims), methods in merged.items():
        block = Block({**fixed, **dict(overrides)}, {"method": methods, **{k: list(v) for k, v in dims}})
        out.extend(_split_when(block, sweep.get("when") or {}))
    return out


def _split_when(block: Block, when: dict[str, list[str]]) -> list[Block]:
    """Split a block on the keys `when` conditions name, and add each condition's overrides where it holds."""
    out = [block]
    for key in dict.fromkeys(condition.split("=", 1)[0] for condition in when):
        if key in block.dims and len(block.dims[key]) > 1:
            out = [Block({**b.overrides, key: value}, {k: v for k, v in b.dims.items() if k != key})
                   for b in out for value in b.dims[key]]
    for b in out:
        single = {**b.overrides, **{k: v[0] for k, v in b.dims.items() if len(v) == 1}}
        for condition, extra in when.items():
            key, value = condition.split("=", 1)
            if single.get(key) == value:
                b.overrides.update(_overrides(extra))
    return out


def jobs(sweep: dict[str, Any], search: list[str] | None = None) -> list[dict[str, str]]:
    """Every job as {key: value} overrides (always with `method` and `privacy`)."""
    return [job for block in blocks(sweep, search) for job in block.jobs()]


def commands(sweep: dict[str, Any], launcher: str = "basic", log_dir: str = "logs", search: list[str] | None = None,
             extra: list[str] | None = None) -> list[list[str]]:
    """One `dpft-train --multirun` per block, swept keys as comma lists."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"LAUNCHER={launcher!r} is not one of {list(LAUNCHERS)}")
    name = sweep["table"]
    launch = [f"hydra/launcher={LAUNCHERS[launcher]}"] if LAUNCHERS[launcher] else []
    return [[sys.executable, "-m", "dpft.train", "--multirun",
             *(f"{k}={v}" for k, v in block.overrides.items()),
             *(f"{k}={','.join(v)}" for k, v in block.dims.items()),
             f"hydra.sweep.dir={log_dir}/tables/{name}", "skip_existing=true", f"table={name}",
             _dirname_excludes(sweep), *launch, *(extra or [])]
            for block in blocks(sweep, search)
            for block in (_per_model(block) if launcher.startswith("slurm") else [block])]


def _per_model(block: Block) -> list[Block]:
    """Slurm: one multirun per model, so that each job array asks for its model's GPUs (`model.gpus`, which
    the launcher reads from the multirun's own config; a swept model would leave it the default's)."""
    models = block.dims.get("model", [])
    if len(models) < 2:
        return [block]
    rest = {k: v for k, v in block.dims.items() if k != "model"}
    return [Block({**block.overrides, "model": model}, rest) for model in models]


def _dirname_excludes(sweep: dict[str, Any]) -> str:
    """Job folders are named by their overrides less the table's fixed ones (the same for every job, and
    long enough to pass the 255-character limit of a file name)."""
    base = OmegaConf.load(CONFIG_DIR / "hydra" / "default.yaml").job.config.override_dirname.exclude_keys
    keys = [*base, *sorted(_overrides(sweep.get("fixed", [])))]
    return "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(f"'{k}'" for k in keys) + "]"


def restrict(sweep: dict[str, Any], item: str, search: list[str] | None) -> list[str] | None:
    """Apply `--set KEY=V1,V2` to the sweep (a grid key's values, a subset of methods or privacy options,
    or a searched key's values); returns the searched keys to expand."""
    key, _, values = item.partition("=")
    values = values.split(",")
    if key in (sweep.get("grid") or {}):
        sweep["grid"][key] = values
        for arm in sweep["arms"]:  # an arm restricted to some values keeps those of them still asked for
            if key in (arm.get("only") or {}):
                arm["only"] = {**arm["only"], key: [v for v in _strs(arm["only"][key]) if v in values]}
        sweep["arms"] = [a for a in sweep["arms"] if all((a.get("only") or {}).values())]
        if not sweep["arms"]:
            raise ValueError(f"--set {item}: no arm runs on these values")
    elif key == "method":
        if unknown := set(values) - {a["method"] for a in sweep["arms"]} - {arm_name(a) for a in sweep["arms"]}:
            raise ValueError(f"--set method: {sorted(unknown)} not among the arms' methods")
        sweep["arms"] = [a for a in sweep["arms"] if a["method"] in values or arm_name(a) in values]
    elif key == "privacy":
        arms = [{**a, "privacy": [p for p in a.get("privacy", ["none"]) if p in values]} for a in sweep["arms"]]
        sweep["arms"] = [a for a in arms if a["privacy"]]
        if not sweep["arms"]:
            raise ValueError(f"--set privacy={','.join(values)}: no arm runs under these options")
    elif key in search_keys(sweep):
        for dims in sweep["search"].values():
            if key in dims:
                dims[key] = values
        return [*(search or []), key]
    else:
        raise ValueError(f"--set {key}: not a key of table {sweep['table']}; use one of "
                         f"{[*(sweep.get('grid') or {}), 'method', 'privacy', *search_keys(sweep)]}")
    return search
