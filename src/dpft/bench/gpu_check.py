"""`make gpu-check` (`python -m dpft.bench.gpu_check`): everything that needs CUDA, on one GPU, in about 8 minutes.

1. `tests/test_gpu.py`: every method family on CUDA under trainer=gpu, one ZO step and one DP clipped sum on CUDA
   against float32 on the CPU, a two-GPU device map where two GPUs exist;
2. training runs at real shapes with random weights (OPT-1.3B and OPT-6.7B × MeZO, DP-ZO, DPZero, DP-LoRA, a few
   dozen steps each, trainer=gpu): status, seconds per step, peak memory;
3. `dpft-bench --device cuda --quick` (the ZO, memory and DP-SGD ratios in the GPU configurations' dtypes);
4. the precision records (`dpft.bench.precision`) on CUDA.

It writes one JSON (`--out`, default gpu-check.json) and prints a table. Without CUDA it says that nothing ran and
exits 0. Commit the JSON under docs/bench/ with the hardware it names.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = ("opt-1.3b", "opt-6.7b")
METHODS = {"mezo": "none", "dpzo": "eps2", "dpzero": "eps2", "dpsgd_lora": "eps2"}
STEPS = 30


def run_overrides(model: str, method: str, folder: Path, steps: int = STEPS) -> list[str]:
    """One training run of part 2: random weights of the real shape, the GPU configuration, short data."""
    return [f"model={model}", "model.pretrained=null", "model.device_map=null", "trainer=gpu", "task=sst2",
            f"method={method}", f"privacy={METHODS[method]}", f"trainer.max_steps={steps}", "task.num_train=1000",
            "task.num_dev=16", "task.num_test=64", "task.max_length=128", "validate=false", "logger=none",
            "checkpoint.every_n_steps=null", f"hydra.run.dir={folder}"]


def _command(args: list[str], timeout: float) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return out.returncode, out.stdout[-4000:] + out.stderr[-4000:], time.perf_counter() - start
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s", time.perf_counter() - start


def run_tests(timeout: float) -> dict[str, Any]:
    code, output, seconds = _command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "tests/test_gpu.py"], timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", output)}
    return {"returncode": code, "seconds": seconds, **counts, "tail": output[-2000:] if code else ""}


def run_training(model: str, method: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        code, output, seconds = _command([sys.executable, "-m", "dpft.train", *run_overrides(model, method, folder)],
                                         timeout)
        record: dict[str, Any] = {"model": model, "method": method, "returncode": code, "wall_seconds": seconds}
        results = folder / "results.json"
        if results.is_file():
            data = json.loads(results.read_text())
            cost = data["cost"]
            record.update(status=data["status"], seconds_per_step=cost.get("seconds_per_step"),
                          peak_memory_gib=cost["peak_memory_bytes"] / 2**30, device=cost["device"],
                          params_total=cost["params_total"], params_trainable=cost["params_trainable"],
                          test_acc=data["metrics"].get("test/acc"),
                          epsilon_spent=data["privacy"].get("epsilon_spent"))
        if code:
            record["tail"] = output[-2000:]
        return record


def run_bench(timeout: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        code, output, _ = _command([sys.executable, "-m", "dpft.bench.run", "--device", "cuda", "--quick", "--only",
                                    "zo", "memory", "dpsgd", "--out", str(out)], timeout)
        return json.loads(out.read_text()) if out.is_file() else [{"name": "bench", "returncode": code,
                                                                   "tail": output[-2000:]}]


def environment() -> dict[str, Any]:
    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}


def _fmt(record: dict[str, Any], key: str, spec: str) -> str:
    return "–" if record.get(key) is None else format(record[key], spec)


def format_table(report: dict[str, Any]) -> str:
    t = report["tests"]
    lines = [f"GPU: {report['environment']['gpu']} ×{report['environment']['gpus']}",
             f"tests/test_gpu.py: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
             f"{t.get('skipped', 0)} skipped ({t['seconds']:.0f} s)", "",
             "| model | method | status | s / step | peak GiB | test acc | ε spent |", "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        status = r.get("status") or f"exit {r['returncode']}"
        lines.append(f"| {r['model']} | {r['method']} | {status} | {_fmt(r, 'seconds_per_step', '.3f')} | "
                     f"{_fmt(r, 'peak_memory_gib', '.1f')} | {_fmt(r, 'test_acc', '.1f')} | "
                     f"{_fmt(r, 'epsilon_spent', '.2f')} |")
    from dpft.bench.run import format_table as bench_table

    records = [r for r in report["bench"] + report["precision"] if "ratio" in r]
    return "\n".join(lines) + "\n\n" + (bench_table(records) if records else "bench: no records")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"),
                        help="what was measured, as JSON (default gpu-check.json)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing ran (tests/test_gpu.py, the GPU runs and the GPU bench need "
              "one)")
        return 0
    os.environ.setdefault("WANDB_MODE", "disabled")
    deadline = time.perf_counter() + args.budget

    def left(share: float) -> float:
        return max(30.0, share * (deadline - time.perf_counter()))

    from dpft.bench.precision import bench_precision

    report: dict[str, Any] = {"environment": environment()}
    report["precision"] = bench_precision("cuda")
    report["tests"] = run_tests(left(0.3))
    report["runs"] = []
    plan = [(model, method) for model in SHAPES for method in METHODS]
    for i, (model, method) in enumerate(plan):
        print(f"[gpu-check] {model} {method}", flush=True)
        report["runs"].append(run_training(model, method, left(0.6 / (len(plan) - i))))
    report["bench"] = run_bench(left(1.0))
    report["seconds"] = args.budget - (deadline - time.perf_counter())
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(format_table(report))
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")
    failed = report["tests"]["returncode"] or any(r["returncode"] for r in report["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
