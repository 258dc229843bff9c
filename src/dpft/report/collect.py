"""`dpft-report <results folder> [--table <name>] [--out <folder>]`: tables (Markdown, LaTeX, CSV) and a
privacy-utility plot from the results.json files below a folder (recursively).

A cell is (task, model, method, target ε); its value is the mean ± standard error over seeds (and
data seeds) of the main test metric (accuracy, or F1 for generation tasks). With `--table`, the
sweep file `sweeps/<name>.yaml` supplies the expected grid (for the list of missing cells) and the
papers' reference values, shown beside each cell with the difference.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpft.report.sweeps import SWEEPS_DIR, jobs, load_sweep, privacy_epsilon


@dataclass
class Cell:
    task: str
    model: str
    method: str
    epsilon: float
    values: list[float] = field(default_factory=list)
    spent: list[float] = field(default_factory=list)
    reference: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def stderr(self) -> float:
        return statistics.stdev(self.values) / math.sqrt(len(self.values)) if len(self.values) > 1 else 0.0

    @property
    def key(self) -> tuple:
        return self.task, self.model, self.method, self.epsilon


def main_metric(results: dict[str, Any]) -> float | None:
    metrics = results.get("metrics", {})
    for key in ("test/f1", "test/acc"):
        if key in metrics:
            return float(metrics[key])
    return None


def collect(folder: Path) -> tuple[list[Cell], list[dict[str, Any]]]:
    """Cells from completed runs, and the failed runs (status other than completed)."""
    cells: dict[tuple, Cell] = {}
    failed = []
    for path in sorted(folder.rglob("results.json")):
        results = json.loads(path.read_text())
        if results.get("status") != "completed":
            failed.append({"path": str(path), "error": results.get("error", results.get("status"))})
            continue
        value = main_metric(results)
        if value is None:
            failed.append({"path": str(path), "error": "no test metric"})
            continue
        eps = float(results["privacy"]["target_epsilon"])
        key = (results["task"], results["model"], results["method"], eps)
        cell = cells.setdefault(key, Cell(*key))
        cell.values.append(value)
        if results["privacy"].get("epsilon_spent") is not None:
            cell.spent.append(float(results["privacy"]["epsilon_spent"]))
    return sorted(cells.values(), key=lambda c: c.key), failed


def attach_references(cells: list[Cell], sweep: dict[str, Any]) -> list[tuple]:
    """Set each cell's reference value; return the expected cells with no completed run."""
    by_key = {c.key: c for c in cells}
    for ref in sweep.get("reference", []):
        key = (ref["task"], ref["model"], ref["method"], float(ref["epsilon"]))
        if key in by_key:
            by_key[key].reference = float(ref["value"])
    return [key for key in expected_cells(sweep) if key not in by_key]


def expected_cells(sweep: dict[str, Any]) -> list[tuple]:
    out = []
    for job in jobs(sweep):
        key = (job["task"], job["model"], job["method"], privacy_epsilon(job["privacy"]))
        if key not in out:
            out.append(key)
    return out


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:g}"


def rows(cells: list[Cell]) -> list[dict[str, Any]]:
    out = []
    for c in cells:
        out.append({"task": c.task, "model": c.model, "method": c.method, "epsilon": _eps(c.epsilon),
                    "epsilon_spent": statistics.fmean(c.spent) if c.spent else None, "n": len(c.values),
                    "mean": c.mean, "stderr": c.stderr, "reference": c.reference,
                    "difference": None if c.reference is None else c.mean - c.reference})
    return out


def to_markdown(table: list[dict[str, Any]], missing: list[tuple], failed: list[dict]) -> str:
    lines = ["| task | model | method | ε target | ε spent | n | test (mean ± s.e.) | paper | Δ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        spent = "–" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3g}"
        ref = "–" if r["reference"] is None else f"{r['reference']:.1f}"
        diff = "–" if r["difference"] is None else f"{r['difference']:+.1f}"
        lines.append(f"| {r['task']} | {r['model']} | {r['method']} | {r['epsilon']} | {spent} | {r['n']} | "
                     f"{r['mean']:.1f} ± {r['stderr']:.1f} | {ref} | {diff} |")
    if missing:
        lines += ["", f"Missing cells ({len(missing)}):", *[f"- {t} / {m} / {meth} / ε={_eps(e)}"
                                                            for t, m, meth, e in missing]]
    if failed:
        lines += ["", f"Failed runs ({len(failed)}):", *[f"- {f['path']}: {f['error']}" for f in failed]]
    return "\n".join(lines) + "\n"


def to_latex(table: list[dict[str, Any]]) -> str:
    lines = [r"\begin{tabular}{llllrrl}", r"\toprule",
             r"Task & Model & Method & $\varepsilon$ & Test & Paper & $\Delta$ \\", r"\midrule"]
    for r in table:
        ref = "--" if r["reference"] is None else f"{r['reference']:.1f}"
        diff = "--" if r["difference"] is None else f"{r['difference']:+.1f}"
        eps = r"$\infty$" if r["epsilon"] == "∞" else r["epsilon"]
        lines.append(f"{r['task']} & {r['model']} & {r['method'].replace('_', chr(92) + '_')} & {eps} & "
                     f"{r['mean']:.1f} $\\pm$ {r['stderr']:.1f} & {ref} & {diff} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def plot(cells: list[Cell], path: Path) -> None:
    """Utility vs ε per method, one panel per (task, model); non-private methods as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c.task, c.model) for c in cells})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (task, model) in zip(axes[0], panels):
        series: dict[str, list[Cell]] = defaultdict(list)
        for c in cells:
            if (c.task, c.model) == (task, model):
                series[c.method].append(c)
        for index, (method, points) in enumerate(sorted(series.items())):
            color = f"C{index % 10}"
            finite = sorted((p for p in points if math.isfinite(p.epsilon)), key=lambda p: p.epsilon)
            if finite:
                ax.errorbar([p.epsilon for p in finite], [p.mean for p in finite], yerr=[p.stderr for p in finite],
                            marker="o", capsize=3, label=method, color=color)
            for p in points:
                if math.isinf(p.epsilon):
                    ax.axhline(p.mean, linestyle="--", linewidth=1, label=f"{method} (ε=∞)", color=color)
        ax.set_xscale("log")
        ax.set_xlabel("ε (target)")
        ax.set_ylabel("test metric (%)")
        ax.set_title(f"{task} · {model}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(folder: Path, out: Path | None = None, table: str | None = None) -> dict[str, Any]:
    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    cells, failed = collect(folder)
    missing = attach_references(cells, load_sweep(table)) if table else []
    table_rows = rows(cells)
    (out / "table.md").write_text(to_markdown(table_rows, missing, failed))
    (out / "table.tex").write_text(to_latex(table_rows))
    with (out / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table_rows[0]) if table_rows else ["task"])
        writer.writeheader()
        writer.writerows(table_rows)
    plot(cells, out / "privacy_utility.png")
    return {"rows": table_rows, "missing": missing, "failed": failed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder searched recursively for results.json")
    parser.add_argument("--table", help=f"sweep name in {SWEEPS_DIR} (reference values, expected cells)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the results folder)")
    args = parser.parse_args(argv)
    result = report(args.folder, args.out, args.table)
    print((args.out or args.folder).joinpath("table.md").read_text())
    print(f"{len(result['rows'])} cells, {len(result['missing'])} missing, {len(result['failed'])} failed")


if __name__ == "__main__":
    main()
