"""The results contract (DESIGN.md §5): one `results.json` per run, the same figures in the W&B summary."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from dpft.environment import environment, git_commit

if TYPE_CHECKING:  # torch and the methods load only where results are built: reports read them without
    import torch

    from dpft.methods.base import MethodModule

SCHEMA_VERSION = 1
# results blocks flattened into the summary as `<block>/<key>` (communication: federated methods only; protocol and
# environment: absent from runs written before they existed, which ran the dpft protocol)
SUMMARY_BLOCKS = ("privacy", "cost", "communication", "protocol", "environment")
OPTIONAL_BLOCKS = ("communication", "protocol", "environment")


def reset_peak_memory() -> None:
    """Start a run's peak-memory count afresh: the jobs of one multirun share a process, whose lifetime peak would
    carry one job's memory into the next's. CUDA: torch's per-device peaks; CPU: Linux's peak resident set size
    (VmHWM, reset by writing 5 to /proc/self/clear_refs; elsewhere the process's lifetime peak stays)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """The peak resident set size since the last reset (Linux: VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory_by_device() -> dict[str, int]:
    """Peak memory of each accelerator this process allocated on (`cuda:0`, `cuda:1`, … for a device map or
    offload), else `{"cpu": the process's peak resident set size}`, since `reset_peak_memory`."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks = {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}
        used = {name: peak for name, peak in peaks.items() if peak > 0}
        if used:
            return used
    return {"cpu": _peak_rss()}


def parameters_digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable parameters (names and bytes): equal digests, equal trained models."""
    import torch

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_results(cfg: DictConfig, module: MethodModule, wall_seconds: float, data_sizes: dict[str, int],
                  params_total: int, params_trainable: int, peak_memory: dict[str, int]) -> dict[str, Any]:

    metrics = dict(sorted(module.final_metrics.items()))
    steps = module.steps_done
    privacy = module.privacy_block()
    cost = {
        "steps": steps,
        "wall_seconds": wall_seconds,
        "train_seconds": module.train_seconds,
        "seconds_per_step": module.train_seconds / steps if steps else None,
        "forward_passes": module.forward_passes,
        "forward_passes_per_step": module.forward_passes / steps if steps else None,
        "peak_memory_bytes": sum(peak_memory.values()),  # over every device used
        "peak_memory_bytes_by_device": peak_memory,
        "device": ", ".join(peak_memory),
        "params_total": params_total,
        "params_trainable": params_trainable,
    }
    results = {
        "schema_version": SCHEMA_VERSION,
        "status": "completed",
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": int(cfg.seed),
        "data_seed": cfg.task.get("data_seed"),
        "protocol": protocol_block(cfg),
        "metrics": metrics,
        "privacy": privacy,
        "cost": cost,
        "hyperparameters": module.hyperparameters(),
        **module.extra_results(),
        "data_sizes": data_sizes,
        "trainable_parameters_sha256": parameters_digest(module.model),
        "git_commit": git_commit(),
        "environment": environment(list(peak_memory)),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if module.ledger is not None and module.diagnostics:
        results["nonprivate_releases"] = {
            "note": "raw statistics of the training data, released because privacy.diagnostics=true: "
                    "ε does not cover them",
            "logged": sorted(module.raw_logged), "values": module.raw_statistics()}
    results["summary"] = flat_summary(results)
    return results


def protocol_block(cfg: DictConfig) -> dict[str, Any]:
    """Whose inputs the run fed the model (`task.protocol`) and whether they were the reference code's token ids
    (`as_paper`): docs/protocols.md."""
    from dpft.data.tasks import build_task_from_config

    task = build_task_from_config(cfg.task)
    return task.protocol_record(int(cfg.task.max_length), cfg.task.get("max_new_tokens", 50))


def build_failure(cfg: DictConfig, err: BaseException) -> dict[str, Any]:
    """results.json of a run that raised: enough to name its cell, the error, and the config to rerun it."""
    interrupted = isinstance(err, KeyboardInterrupt | SystemExit)  # Ctrl-C, SIGTERM (cluster time limit)
    privacy = cfg.get("privacy", {})
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "interrupted" if interrupted else "failed",
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": int(cfg.seed),
        "data_seed": cfg.task.get("data_seed"),
        "error": {"type": type(err).__name__, "message": str(err),
                  "traceback": traceback.format_exception(err)[-12:]},
        "privacy": {"target_epsilon": float(privacy.get("target_epsilon", math.inf)),
                    "target_delta": float(privacy.get("target_delta", 0.0))},
        "git_commit": git_commit(),
        "environment": environment(),
        "config": _container(cfg),
    }


def _container(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # the error may be in an interpolation itself
        return OmegaConf.to_container(cfg, resolve=False)


def flat_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The flat figures for dashboards: `test/acc`, `privacy/epsilon_spent`, `cost/seconds_per_step`..."""
    out: dict[str, Any] = {k: results[k] for k in ("method", "model", "task", "seed", "data_seed", "status")}
    out.update(results["metrics"])
    for block in SUMMARY_BLOCKS:
        out.update({f"{block}/{k}": v for k, v in results.get(block, {}).items()})
    return out


def results_from_summary(summary: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The inverse of `flat_summary`: the results blocks from a run summary (e.g. read back from W&B, where
    training also logs `val/*`, `privacy/*` under the same names; other keys are left out)."""
    out: dict[str, Any] = {k: summary.get(k) for k in ("method", "model", "task", "seed", "data_seed", "status")}
    if "error" in summary:
        out["error"] = summary["error"]
    out["metrics"] = {k: v for k, v in summary.items() if k.startswith(("val/", "test/"))}
    for block in SUMMARY_BLOCKS:
        values = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith(f"{block}/")}
        if values or block not in OPTIONAL_BLOCKS:
            out[block] = values
    if config is not None:
        out["config"] = config
    return out


# strict JSON has no infinities or NaN: they are written as these strings (float() reads them back) and
# `read_results` turns them into floats again
NONFINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _finite_or_not(value: Any) -> Any:
    if isinstance(value, str):
        return NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _finite_or_not(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_not(v) for v in value]
    return value


def write_results(results: dict[str, Any], path: Path) -> None:
    """Atomic write of strict JSON (∞ and NaN as the strings "Infinity", "NaN"): a reader never sees a half-written
    results.json, and any JSON parser reads it. The file's mode follows the umask, as a plain open() would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(_strict(results), handle, indent=2, default=str, allow_nan=False)
        handle.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(handle.name, 0o666 & ~umask)  # a temporary file is created 0600
    os.replace(handle.name, path)


def read_results(path: Path) -> dict[str, Any]:
    """A results.json as written: the strings "Infinity", "-Infinity", "NaN" as floats again."""
    return _finite_or_not(json.loads(Path(path).read_text()))


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A small Markdown table of runs (metrics in %: accuracy or F1)."""
    header = "| method | model | task | seed | val | test | ε (target) | ε spent | s/step | wall s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        m = r["metrics"]
        key = "f1" if "test/f1" in m else "acc"
        val, test = m.get(f"val/{key}"), m.get(f"test/{key}")
        p, c = r["privacy"], r["cost"]
        lines.append("| " + " | ".join([
            r["method"], r["model"], r["task"], str(r["seed"]),
            _fmt(val), _fmt(test),
            _fmt(p["target_epsilon"], 2), _fmt(p["epsilon_spent"], 2),
            _fmt(c["seconds_per_step"], 3), _fmt(c["wall_seconds"], 1),
        ]) + " |")
    return "\n".join(lines)
