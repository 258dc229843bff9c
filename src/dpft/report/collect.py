"""`dpft-report <results folder> [--table <name>] [--out <folder>]`: tables (Markdown, LaTeX, CSV) and a
privacy-utility plot from the results.json files below a folder (recursively), or with
`--wandb <entity/project>` from the summaries of a W&B project's runs (the same figures, the same code
after loading).

A cell is (task, model, method, target ε); its value is the mean ± standard error over seeds (and
data seeds) of the main test metric (accuracy, or F1 for generation tasks). With `--table` (a sweep
name or a sweep file's path), the sweep supplies the expected grid (for the list of missing cells),
the papers' reference values (shown beside each cell with the difference), the comparisons to show
(method - baseline per cell) and the searched hyperparameters (per cell, the values with the best
mean validation metric are kept, and beside per-run ε the ε of the whole search: every run of the cell's
search composed). `--log-wandb` logs the report as a W&B run of its own (job type
"report", the table's group): the table as a W&B Table and the plot as an image.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dpft.data.tasks import build_task_from_config, data_dir
from dpft.environment import signature
from dpft.privacy.accounting import PrivacyConfigError, composed_epsilon
from dpft.report.sweeps import job_method, load_sweep, privacy_epsilon, search_keys
from dpft.report.sweeps import jobs as sweep_jobs
from dpft.results import read_results, results_from_summary

MAIN_METRICS = ("test/f1", "test/acc")  # F1 for generation tasks, else accuracy
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
CellKey = tuple[str, str, str, float]  # task, model, method, target ε


@dataclass
class Cell:
    task: str
    model: str
    method: str
    epsilon: float
    values: list[float] = field(default_factory=list)
    spent: list[float] = field(default_factory=list)
    reference: float | None = None
    source: str | None = None
    selected: dict[str, Any] = field(default_factory=dict)  # searched values kept (best validation metric)
    tried: int = 1  # searched configurations seen for this cell
    # a searched cell: (ε, δ) of all its runs composed (the search and the choice), and how many runs
    selection_epsilon: float | None = None
    selection_delta: float | None = None
    selection_runs: int = 0
    costs: list[dict[str, Any]] = field(default_factory=list)  # each run's cost (and communication) figures
    # the configuration values that set this cell's runs apart from other runs of the same (task, model, method, ε)
    variant: dict[str, Any] = field(default_factory=dict)
    deltas: list[float] = field(default_factory=list)
    # per run: whether it fed the model the paper's token ids (its results.json `protocol.as_paper`)
    as_paper: list[bool] = field(default_factory=list)
    # per private run: its privacy convention (results.json `privacy.convention`); the reference's, from the sweep
    conventions: list[str] = field(default_factory=list)
    reference_convention: str | None = None

    @property
    def paper_inputs(self) -> bool:
        """Whether every run read the paper's inputs: else a paper's value beside it is not like for like."""
        return bool(self.as_paper) and all(self.as_paper)

    @property
    def paper_privacy(self) -> bool:
        """Whether every private run's privacy convention is the one the paper's value was obtained under."""
        return same_convention([self], self.reference_convention)

    @property
    def label(self) -> str:
        """The method, with the values that tell this cell from another of the same method and ε."""
        return self.method + (" [" + ", ".join(f"{k}={v}" for k, v in self.variant.items()) + "]" if self.variant
                              else "")

    def cost(self, key: str, total: bool = False) -> float | None:
        """The mean (or the sum) over the cell's runs of one `run_cost` figure; None when no run has it."""
        values = [c[key] for c in self.costs if c.get(key) is not None]
        return None if not values else sum(values) if total else statistics.fmean(values)

    @property
    def devices(self) -> str | None:
        return " / ".join(sorted({c["device"] for c in self.costs if c.get("device")})) or None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def stderr(self) -> float:
        return statistics.stdev(self.values) / math.sqrt(len(self.values)) if len(self.values) > 1 else 0.0

    @property
    def key(self) -> CellKey:
        return self.task, self.model, self.method, self.epsilon


@dataclass
class Comparison:
    """method - baseline on the same task and model (independent runs: the standard errors add in quadrature)."""

    cell: Cell
    baseline: Cell
    reference: float | None = None  # the paper's difference, when it reports one
    reference_convention: str | None = None

    @property
    def difference(self) -> float:
        return self.cell.mean - self.baseline.mean

    @property
    def paper_inputs(self) -> bool:
        return self.cell.paper_inputs and self.baseline.paper_inputs

    @property
    def paper_privacy(self) -> bool:
        return same_convention([self.cell, self.baseline], self.reference_convention)

    @property
    def stderr(self) -> float:
        return math.hypot(self.cell.stderr, self.baseline.stderr)


def same_convention(cells: list[Cell], convention: str | None) -> bool:
    """Whether the private runs of these cells all ran under `convention` (None: the paper did not state one)."""
    return convention is None or all(c == convention for cell in cells for c in cell.conventions)


def run_cost(results: dict[str, Any]) -> dict[str, Any]:
    """One run's cost figures: peak memory (GiB, summed over its devices), seconds per step, device-hours (train
    wall time × devices), forward passes, and for federated methods the upload bytes of one client in one round."""
    cost, communication = results.get("cost") or {}, results.get("communication") or {}
    devices = [d for d in str(cost.get("device") or "cpu").split(", ") if d]
    seconds = cost.get("wall_seconds")
    return {"peak_memory_gib": None if cost.get("peak_memory_bytes") is None else cost["peak_memory_bytes"] / 2**30,
            "seconds_per_step": cost.get("seconds_per_step"),
            "device_hours": None if seconds is None else seconds * len(devices) / 3600,
            "device": "cpu" if devices == ["cpu"] else f"{len(devices)} GPU" if devices else None,
            "forward_passes": cost.get("forward_passes"),
            "upload_bytes_per_client_round": communication.get("upload_bytes_per_client")}


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:g}"


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


NOT_PAPER_INPUTS = ("† Not the paper's inputs: the cell's runs did not all feed the model the paper's token ids "
                    "(task.protocol=dpft, or other lengths than the paper's; results.json `protocol`, "
                    "docs/protocols.md), so the paper's value beside it is not a like-for-like reference.")


NOT_PAPER_PRIVACY = ("‡ Not the paper's privacy convention: the cell's private runs were accounted under another "
                     "adjacency than the paper's value (results.json `privacy.convention`; DPZero's is "
                     "privacy.convention=paper, replace-one; docs/privacy.md), so at the same ε they add other noise.")


def _mark(reference: float | None, paper_inputs: bool, paper_privacy: bool = True) -> str:
    """† beside a paper's value the runs did not read the paper's inputs for, ‡ where they were accounted under
    another privacy convention than the paper's: not like for like."""
    if reference is None:
        return ""
    return ("" if paper_inputs else "†") + ("" if paper_privacy else "‡")


def _selection_text(row: dict[str, Any], latex: bool = False) -> str:
    """A searched cell's ε of the selection with its runs (and δ); a dash for a cell that was not searched."""
    eps = row["selection_epsilon"]
    if eps is None:
        return "--" if latex else "–" if row["tried"] < 2 else "not computed (see below)"
    if latex:
        return (r"$\infty$" if math.isinf(eps) else f"{eps:.3g}") + f" ({row['selection_runs']})"
    return f"{_eps(eps) if math.isinf(eps) else format(eps, '.3g')} ({row['selection_runs']} runs, δ={row['selection_delta']:g})"


# --- loading: local results.json files or W&B run summaries, both as results dicts ------------------------
def load_local(folder: Path) -> list[dict[str, Any]]:
    """Every results.json below `folder`, with its path as `source`."""
    out = []
    for path in sorted(Path(folder).rglob("results.json")):
        try:
            results = read_results(path)
        except (OSError, json.JSONDecodeError) as err:
            results = {"status": "unreadable", "error": str(err)}
        out.append({**results, "source": str(path)})
    return out


def load_wandb(path: str, table: str | None = None, api: Any = None) -> list[dict[str, Any]]:
    """The training runs of a W&B project (`entity/project`), as results dicts rebuilt from their summaries
    (train.py writes the results block there); with `table`, only that table's group."""
    if api is None:
        import wandb

        api = wandb.Api()
    latest: dict[str, dict[str, Any]] = {}  # one result per job: a cell run again shows up as a second W&B run
    runs = [r for r in api.runs(path, filters={"group": table} if table else None) if r.job_type != "report"]
    for run in sorted(runs, key=lambda r: str(getattr(r, "created_at", "") or "")):
        summary = dict(run.summary_metrics)
        source = "/".join(run.path)
        if "method" not in summary:
            results = {"status": run.state, "error": f"no results in the run summary (W&B state {run.state})",
                       "source": source}
        else:
            results = {**results_from_summary(summary, config=dict(run.config)), "source": source}
        job = str((dict(run.config).get("paths") or {}).get("output_dir") or source)
        if results.get("status") == "completed" or latest.get(job, {}).get("status") != "completed":
            latest[job] = results  # the newest completed run of the job, else its newest run
    return list(latest.values())


# --- cells, references, comparisons -----------------------------------------------------------------------
def main_metric(results: dict[str, Any]) -> float | None:
    metrics = results.get("metrics", {})
    return next((float(metrics[k]) for k in MAIN_METRICS if metrics.get(k) is not None), None)


def _validation(runs: list[dict[str, Any]]) -> float:
    values = [float(v) for r in runs for k in ("val/f1", "val/acc") if (v := r.get("metrics", {}).get(k)) is not None]
    return statistics.fmean(values) if values else -math.inf


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _epsilon(results: dict[str, Any]) -> float:
    value = results["privacy"].get("target_epsilon")
    return math.inf if value is None and results["privacy"].get("mechanism") == "none" else float(value)


# the columns of `Report.rows()`, in order
ROW_COLUMNS = ("task", "model", "method", "variant", "epsilon", "delta", "epsilon_spent", "n", "mean", "stderr",
               "reference", "difference", "reference_source", "paper_inputs", "paper_privacy", "selected", "tried", "selection_epsilon",
               "selection_delta", "selection_runs", "baseline", "vs_baseline", "vs_baseline_stderr",
               "vs_baseline_reference", "peak_memory_gib", "seconds_per_step", "device_hours", "device",
               "forward_passes", "upload_bytes_per_client_round")


@dataclass
class Report:
    cells: list[Cell]
    failed: list[dict[str, Any]] = field(default_factory=list)
    missing: list[CellKey] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    table: str | None = None
    selection: list[str] = field(default_factory=list)  # how the hyperparameters were chosen, and its ε
    split: list[str] = field(default_factory=list)  # cells whose runs did not agree, and in what
    environments: list[str] = field(default_factory=list)  # cells pooled from runs of different environments

    def select(self, methods=None, tasks=None, models=None) -> Report:
        """The report restricted to some methods, tasks or models (None keeps all): for notebooks."""
        def keep(task, model, method):
            return all(v is None or x in v for x, v in ((task, tasks), (model, models), (method, methods)))

        return replace(self, cells=[c for c in self.cells if keep(c.task, c.model, c.method)],
                       missing=[m for m in self.missing if keep(*m[:3])],
                       comparisons=[c for c in self.comparisons if keep(c.cell.task, c.cell.model, c.cell.method)])

    def rows(self) -> list[dict[str, Any]]:
        compared = {c.cell.key: c for c in self.comparisons}
        out = []
        for c in self.cells:
            cmp = compared.get(c.key)
            out.append({
                "task": c.task, "model": c.model, "method": c.method,
                "variant": ", ".join(f"{k}={v}" for k, v in c.variant.items()) or None,
                "epsilon": c.epsilon, "delta": statistics.fmean(c.deltas) if c.deltas else None,
                "epsilon_spent": statistics.fmean(c.spent) if c.spent else None, "n": len(c.values),
                "mean": c.mean, "stderr": c.stderr, "reference": c.reference,
                "difference": None if c.reference is None else c.mean - c.reference, "reference_source": c.source,
                "paper_inputs": c.paper_inputs, "paper_privacy": c.paper_privacy,
                "selected": " ".join(f"{k}={v}" for k, v in c.selected.items()) or None, "tried": c.tried,
                "selection_epsilon": c.selection_epsilon, "selection_delta": c.selection_delta,
                "selection_runs": c.selection_runs or None,
                "baseline": cmp and f"{cmp.baseline.label} (ε={_eps(cmp.baseline.epsilon)})",
                "vs_baseline": cmp and cmp.difference, "vs_baseline_stderr": cmp and cmp.stderr,
                "vs_baseline_reference": cmp and cmp.reference,
                "peak_memory_gib": c.cost("peak_memory_gib"), "seconds_per_step": c.cost("seconds_per_step"),
                "device_hours": c.cost("device_hours", total=True), "device": c.devices,
                "forward_passes": c.cost("forward_passes"),
                "upload_bytes_per_client_round": c.cost("upload_bytes_per_client_round"),
            })
        return out

    def frame(self):
        """The rows as a pandas DataFrame (ε and δ as numbers, ε = inf for non-private runs); with no cells,
        an empty one with the same columns, so filters and pivots still run."""
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=ROW_COLUMNS)

    def markdown(self) -> str:
        rows = self.rows()
        searched = any(r["selected"] for r in rows)
        federated = any(r["upload_bytes_per_client_round"] is not None for r in rows)
        head = ["task", "model", "method", "ε target", "δ", "ε spent", "n", "test (mean ± s.e.)", "paper", "Δ"]
        head += ["selected (best val)", "ε of the selection (all runs composed)"] if searched else []
        head += ["peak GiB", "s / step", "device-hours", "forward passes"]
        head += ["upload bytes / client-round"] if federated else []
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            method = r["method"] + (f" [{r['variant']}]" if r["variant"] else "")
            score = f"{r['mean']:.1f} ± {r['stderr']:.1f}" if r["n"] > 1 else f"{r['mean']:.1f}"
            cells = [r["task"], r["model"], method, _eps(r["epsilon"]), _fmt(r["delta"], ".3g"),
                     _fmt(r["epsilon_spent"], ".3g"), str(r["n"]), score,
                     _fmt(r["reference"]) + _mark(r["reference"], r["paper_inputs"], r["paper_privacy"]),
                     _fmt(r["difference"], "+.1f")]
            if searched:
                cells += [f"{r['selected']} (of {r['tried']})" if r["selected"] else "–", _selection_text(r)]
            cells += [_fmt(r["peak_memory_gib"], ".2f"), _fmt(r["seconds_per_step"], ".3g"),
                      _fmt(r["device_hours"], ".3g") + (f" ({r['device']})" if r["device"] else ""),
                      _fmt(r["forward_passes"], ".0f")]
            cells += [_fmt(r["upload_bytes_per_client_round"], ".0f")] if federated else []
            lines.append("| " + " | ".join(cells) + " |")
        if self.comparisons:
            lines += ["", "Differences (method − baseline, ± s.e.):", "",
                      "| task | model | method | baseline | ε | difference | paper | Δ |", "|---|---|---|---|---|---|---|---|"]
            for c in self.comparisons:
                paper_delta = None if c.reference is None else c.difference - c.reference
                lines.append(f"| {c.cell.task} | {c.cell.model} | {c.cell.label} | {c.baseline.label} (ε="
                             f"{_eps(c.baseline.epsilon)}) | {_eps(c.cell.epsilon)} | {c.difference:+.1f} ± "
                             f"{c.stderr:.1f} | {_fmt(c.reference, '+.2f')}"
                             f"{_mark(c.reference, c.paper_inputs, c.paper_privacy)} | "
                             f"{_fmt(paper_delta, '+.1f')} |")
        if self.split:
            lines += ["", "Runs of one (task, model, method, ε) with other settings are kept apart (a cell pools only "
                      "runs whose configurations agree but for the seeds):", *[f"- {line}" for line in self.split]]
        if self.environments:
            lines += ["", "Warning: cells pooled from runs computed with different package versions or devices "
                      "(each run's results.json `environment`):", *[f"- {line}" for line in self.environments]]
        if self.selection:
            lines += ["", "Hyperparameter selection:", *[f"- {line}" for line in self.selection]]
        if self.sources:
            lines += ["", "Paper values: " + "; ".join(self.sources) + "."]
        marks = "".join(_mark(x.reference, x.paper_inputs, x.paper_privacy) for x in [*self.cells, *self.comparisons])
        lines += ["", NOT_PAPER_INPUTS] if "†" in marks else []
        lines += ["", NOT_PAPER_PRIVACY] if "‡" in marks else []
        if self.missing:
            lines += ["", f"Missing cells ({len(self.missing)}):",
                      *[f"- {t} / {m} / {meth} / ε={_eps(e)}" for t, m, meth, e in self.missing]]
        if self.failed:
            lines += ["", f"Failed runs ({len(self.failed)}):", *[f"- {f['path']}: {f['error']}" for f in self.failed]]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        def esc(text: str) -> str:
            return text.replace("_", r"\_")

        def eps(value: float) -> str:
            return r"$\infty$" if math.isinf(value) else f"{value:g}"

        rows = self.rows()
        searched = any(r["selected"] for r in rows)
        lines = [r"\begin{tabular}{llllrrrrl" + "r" * searched + "rrr}", r"\toprule",
                 r"Task & Model & Method & $\varepsilon$ & $\varepsilon$ spent & $n$ & Test & Paper & $\Delta$"
                 + r" & $\varepsilon$ of the selection (runs)" * searched + r" & Memory (GiB) & s/step & Device-h \\",
                 r"\midrule"]
        for c, r in zip(self.cells, rows):
            diff = None if c.reference is None else c.mean - c.reference
            selection = f" & {_selection_text(r, latex=True)}" if searched else ""
            score = f"{c.mean:.1f} $\\pm$ {c.stderr:.1f}" if len(c.values) > 1 else f"{c.mean:.1f}"
            mark = _mark(c.reference, c.paper_inputs, c.paper_privacy).replace("†", r"$^\dagger$").replace(
                "‡", r"$^\ddagger$")
            lines.append(f"{esc(c.task)} & {esc(c.model)} & {esc(c.label)} & {eps(c.epsilon)} & "
                         f"{_fmt(r['epsilon_spent'], '.3g').replace('–', '--')} & {r['n']} & "
                         f"{score} & {_fmt(c.reference).replace('–', '--')}{mark} & "
                         f"{_fmt(diff, '+.1f').replace('–', '--')}{selection} & "
                         + " & ".join(_fmt(r[k], f).replace("–", "--") for k, f in (
                             ("peak_memory_gib", ".2f"), ("seconds_per_step", ".3g"), ("device_hours", ".3g")))
                         + " \\\\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        marks = "".join(_mark(c.reference, c.paper_inputs, c.paper_privacy) for c in self.cells)
        if "†" in marks:
            lines.append("% $^\\dagger$ " + NOT_PAPER_INPUTS[2:])
        if "‡" in marks:
            lines.append("% $^\\ddagger$ " + NOT_PAPER_PRIVACY[2:])
        if self.comparisons:
            lines += ["", r"\begin{tabular}{lllll}", r"\toprule",
                      r"Task & Model & Method $-$ baseline & $\varepsilon$ & Difference \\", r"\midrule"]
            for c in self.comparisons:
                lines.append(f"{esc(c.cell.task)} & {esc(c.cell.model)} & {esc(c.cell.method)} $-$ "
                             f"{esc(c.baseline.method)} & {eps(c.cell.epsilon)} & {c.difference:+.1f} $\\pm$ "
                             f"{c.stderr:.1f} \\\\")
            lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [f"% missing cell: {t} / {m} / {meth} / eps={_eps(e)}" for t, m, meth, e in self.missing]
        lines += [f"% failed run: {f['path']}" for f in self.failed]
        return "\n".join(lines) + "\n"

    def figure(self):
        """Utility vs ε per method, one panel per (task, model); non-private methods as dashed lines. A
        matplotlib Figure of its own (no pyplot state: shown inline by notebooks, saved by `write`)."""
        from matplotlib.figure import Figure

        panels = sorted({(c.task, c.model) for c in self.cells})
        columns = min(max(len(panels), 1), 4)  # a grid of at most 4 columns: a big table stays readable
        rows = math.ceil(max(len(panels), 1) / columns)
        fig = Figure(figsize=(5 * columns, 4 * rows), layout="tight")
        axes = fig.subplots(rows, columns, squeeze=False).flatten()
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax, (task, model) in zip(axes, panels):
            series: dict[str, list[Cell]] = defaultdict(list)
            for c in self.cells:
                if (c.task, c.model) == (task, model):
                    series[c.label].append(c)
            for index, (method, points) in enumerate(sorted(series.items())):
                color = f"C{index % 10}"
                finite = sorted((p for p in points if math.isfinite(p.epsilon)), key=lambda p: p.epsilon)
                if finite:  # a marker shape of its own, so that methods with equal results stay visible
                    ax.errorbar([p.epsilon for p in finite], [p.mean for p in finite],
                                yerr=[p.stderr for p in finite], marker=MARKERS[index % len(MARKERS)],
                                markersize=9 - 2 * (index % 3), fillstyle="full" if index % 2 == 0 else "none",
                                capsize=3, label=method, color=color)
                for p in points:
                    if math.isinf(p.epsilon):
                        ax.axhline(p.mean, linestyle="--", linewidth=1, label=f"{method} (ε=∞)", color=color)
            ax.set_xscale("log")
            ax.set_xlabel("ε (target)")
            ax.set_ylabel("test metric (%)")
            ax.set_title(f"{task} · {model}")
            ax.legend(fontsize=8)
        return fig

    def memory_figure(self):
        """Utility against peak memory per method (each ε a point, labelled), one panel per (task, model): what
        each method's accuracy costs in memory."""
        from matplotlib.figure import Figure

        panels = sorted({(c.task, c.model) for c in self.cells if c.cost("peak_memory_gib") is not None})
        columns = min(max(len(panels), 1), 4)
        rows = math.ceil(max(len(panels), 1) / columns)
        fig = Figure(figsize=(5 * columns, 4 * rows), layout="tight")
        axes = fig.subplots(rows, columns, squeeze=False).flatten()
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        methods = sorted({c.label for c in self.cells})
        for ax, (task, model) in zip(axes, panels):
            for c in self.cells:
                memory = c.cost("peak_memory_gib")
                if (c.task, c.model) != (task, model) or memory is None:
                    continue
                index = methods.index(c.label)
                ax.errorbar([memory], [c.mean], yerr=[c.stderr], marker=MARKERS[index % len(MARKERS)], capsize=3,
                            color=f"C{index % 10}", label=c.label)
                ax.annotate(f"ε={_eps(c.epsilon)}", (memory, c.mean), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("peak memory (GiB, all devices)")
            ax.set_ylabel("test metric (%)")
            ax.set_title(f"{task} · {model}")
        return fig

    def write(self, out: Path) -> None:
        """table.md, table.tex, table.csv, privacy_utility.png and memory_utility.png into `out`."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(self.markdown())
        (out / "table.tex").write_text(self.latex())
        rows = self.rows()
        with (out / "table.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["task"])
            writer.writeheader()
            writer.writerows(rows)
        self.figure().savefig(out / "privacy_utility.png", dpi=120)
        self.memory_figure().savefig(out / "memory_utility.png", dpi=120)


def _error_line(results: dict[str, Any]) -> str:
    """`status (task / model / method / ε): Type: message` for a run that did not complete."""
    error = results.get("error")
    if isinstance(error, dict):  # train.py's record of a failed run
        error = f"{error.get('type')}: {str(error.get('message', '')).splitlines()[0] if error.get('message') else ''}"
    where = " / ".join(str(results.get(k)) for k in ("task", "model", "method") if results.get(k) is not None)
    eps = (results.get("privacy") or {}).get("target_epsilon")
    cell = f" ({where}{f' / ε={_eps(float(eps))}' if eps is not None else ''})" if where else ""
    return f"{results.get('status')}{cell}: {error or 'no error recorded'}"


# where a run is written and how it is logged, not what it computes; and the seeds, which a cell averages over
NOT_COMPARED = ("seed", "task.data_seed", "method.seed", "paths.", "hydra.", "logger", "table", "tags", "skip_existing",
                "resume", "ckpt_path", "checkpoint.", "optimized_metric", "privacy.diagnostics", "trainer.logger",
                "trainer.enable_progress_bar", "trainer.default_root_dir", "model.pretrained", "model.gpus")


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        return {k: v for key, value in config.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(config, sort_keys=True) if isinstance(config, list) else config}


def _compared(run: dict[str, Any], searched: list[str]) -> dict[str, Any]:
    """The run's composed configuration, flattened, less what a cell may pool over (seeds, output places,
    the searched keys: those are the cell's configurations)."""
    return {k: v for k, v in _flat(run.get("config") or {}).items()
            if not k.startswith(NOT_COMPARED) and k not in searched}


def _variants(runs: list[dict[str, Any]], searched: list[str]) -> list[tuple[dict[str, Any], list[dict]]]:
    """The runs split by their compared configuration, each part with the values that set it apart."""
    parts: dict[str, tuple[dict, list]] = {}
    for r in runs:
        flat = _compared(r, searched)
        parts.setdefault(json.dumps(flat, sort_keys=True, default=str), (flat, []))[1].append(r)
    if len(parts) == 1:
        return [({}, runs)]
    keys = sorted({k for flat, _ in parts.values() for k in flat})
    differ = [k for k in keys if len({json.dumps(flat.get(k), default=str) for flat, _ in parts.values()}) > 1]
    return [({k: flat.get(k) for k in differ}, rs) for flat, rs in parts.values()]


def _mixed_environments(runs: list[dict[str, Any]]) -> str | None:
    """What differs between the environments of runs pooled in one cell ('' keys: runs without a block), or None."""
    signatures = [signature(r.get("environment")) for r in runs]
    if len({json.dumps(sig, sort_keys=True, default=str) for sig in signatures}) < 2:
        return None
    keys = sorted({k for sig in signatures for k in sig}) or ["environment"]
    differ = {k: sorted({str(sig.get(k, "not recorded")) for sig in signatures}) for k in keys}
    return f"{len(runs)} runs, " + "; ".join(f"{k}: {' / '.join(v)}" for k, v in differ.items() if len(v) > 1)


def build(results: list[dict[str, Any]], sweep: dict[str, Any] | None = None) -> Report:
    """Cells from completed runs (failed ones listed); with a sweep: references, comparisons, missing cells,
    and per cell the searched configuration with the best mean validation metric."""
    searched = search_keys(sweep) if sweep else []
    groups: dict[CellKey, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    failed, left_out = [], defaultdict(int)
    for r in results:
        if r.get("status") != "completed" or main_metric(r) is None:
            failed.append({"path": r.get("source"), "error": _error_line(r) if r.get("status") != "completed"
                           else "no test metric"})
            try:
                left_out[(r["task"], r["model"], r["method"], _epsilon(r))] += 1
            except (KeyError, TypeError, ValueError):  # too broken to name its cell
                pass
        else:
            key = (r["task"], r["model"], r["method"], _epsilon(r))
            groups[key][tuple(_lookup(r.get("config") or {}, k) for k in searched)].append(r)
    cells, selection, split, environments = [], [], [], []
    for key, runs in sorted(((k, [r for rs in c.values() for r in rs]) for k, c in groups.items()),
                            key=lambda item: item[0]):
        variants = _variants(runs, searched)
        if len(variants) > 1:
            split.append(f"{key[0]} / {key[1]} / {key[2]} / ε={_eps(key[3])}: {len(variants)} cells, the runs differ in "
                         + ", ".join(variants[0][0]))
        for variant, part in variants:
            mixed = _mixed_environments(part)
            if mixed:
                label = ", ".join(f"{k}={v}" for k, v in variant.items())
                environments.append(f"{key[0]} / {key[1]} / {key[2]}{f' ({label})' if label else ''} / "
                                    f"ε={_eps(key[3])}: {mixed}")
            configurations: dict[tuple, list[dict]] = defaultdict(list)
            for r in part:
                configurations[tuple(_lookup(r.get("config") or {}, k) for k in searched)].append(r)
            cells.append(_cell(key, configurations, searched, variant))
            if len(configurations) > 1:
                selection += _charge_selection(cells[-1], part, left_out[key])
    if any(c.selection_runs for c in cells):
        searched_runs = [r for c in groups.values() if len(c) > 1 for rs in c.values() for r in rs]
        selection = [SELECTION_BOUND, *selection, *_selection_data(searched_runs)]
    report = Report(cells, failed, table=sweep.get("table") if sweep else None, selection=selection, split=split,
                    environments=environments)
    if sweep:
        _attach_sweep(report, sweep)
    return report


def _cell(key: CellKey, configurations: dict[tuple, list[dict]], searched: list[str],
          variant: dict[str, Any]) -> Cell:
    """One cell: its searched configuration with the best mean validation metric (all its runs when not searched)."""
    if len(configurations) > 1 and all(_validation(runs) == -math.inf for runs in configurations.values()):
        raise ValueError(f"cell {key}: {len(configurations)} searched configurations of {searched} but no "
                         "validation metric to choose by: run searches with validate=true")
    choice, runs = max(sorted(configurations.items(), key=str), key=lambda item: _validation(item[1]))
    varied = [i for i in range(len(searched)) if len({c[i] for c in configurations}) > 1]
    return Cell(*key, values=[main_metric(r) for r in runs],
                spent=[float(r["privacy"]["epsilon_spent"]) for r in runs
                       if r["privacy"].get("epsilon_spent") is not None],
                selected={searched[i]: choice[i] for i in varied}, tried=len(configurations),
                costs=[run_cost(r) for r in runs], variant=variant,
                deltas=[float(r["privacy"]["target_delta"]) for r in runs if r["privacy"].get("target_delta")],
                as_paper=[bool((r.get("protocol") or {}).get("as_paper")) for r in runs],
                conventions=[r["privacy"].get("convention") or "ours" for r in runs
                             if r["privacy"].get("mechanism") not in (None, "none")])


SELECTION_BOUND = (
    "ε of the selection: per searched cell, all runs of its search (configurations × seeds × data seeds: the "
    "data seeds' training sets are drawn from one pool) composed by dp-accounting's RDP accountant (PLD for "
    "replace-one runs, privacy.convention=paper) at the runs' "
    "target δ (pure-ε runs add up): a bound on the runs and the choice among them, which treats the validation "
    "split as public. Papernot & Steinke (2022) bound random search with a random number of runs, not this grid "
    "search: their result is not used.")


def _charge_selection(cell: Cell, runs: list[dict[str, Any]], left_out: int) -> list[str]:
    """Compose every run of a searched cell into its ε of the selection; the lines to say beside it."""
    name = f"{cell.task} / {cell.model} / {cell.method} / ε={_eps(cell.epsilon)}"
    try:
        cell.selection_epsilon, cell.selection_delta = composed_epsilon(r["privacy"] for r in runs)
    except PrivacyConfigError as err:
        return [f"{name}: ε of the selection not computed: {err}"]
    cell.selection_runs = len(runs)
    return [f"{name}: {left_out} run(s) of the search did not complete and are not in its ε of the selection "
            "(what they spent before failing is not recorded)"] if left_out else []


def _selection_data(runs: list[dict[str, Any]]) -> list[str]:
    """Where a validation split a search chose on (data seed s) holds training examples (by text) of data
    seed s' of the same task: the choice read them without noise."""
    if data_dir() is None:
        return ["The overlap of the validation splits chosen on with the training splits was not checked: "
                "no local data (set DPFT_DATA_DIR)."]
    seeds: dict[str, set] = defaultdict(set)  # the task config less its data seed -> the data seeds
    for r in runs:
        task_cfg = {**((r.get("config") or {}).get("task") or {}), "name": r["task"]}
        task_cfg.pop("data_seed", None)
        seeds[json.dumps(task_cfg, sort_keys=True)].add(r.get("data_seed"))
    lines, overlaps = [], []
    for task_cfg, data_seeds in sorted(seeds.items()):
        task = json.loads(task_cfg)
        order = sorted(data_seeds, key=lambda s: -1 if s is None else int(s))
        try:
            texts = {s: {split: {json.dumps(e.fields, sort_keys=True, default=str) for e in examples}
                         for split, examples in build_task_from_config({**task, "data_seed": s})
                         .splits(("train", "val")).items()} for s in order}
        except (OSError, ValueError) as err:  # a missing file, or a task with no local copy
            lines.append(f"{task['name']}: the overlap of validation and training splits was not checked: {err}")
            continue
        found = []
        for s in order:
            held = [f"{'its own' if t == s else f'data seed {t}'} ({n})"
                    for t in order if (n := len(texts[s]["val"] & texts[t]["train"]))]
            if held:
                found.append(f"{task['name']}: data seed {s}'s validation split (chosen on) holds training "
                             "examples of " + ", ".join(held))
        overlaps += found
        lines += found or [f"{task['name']}: the validation splits of data seeds {', '.join(map(str, order))} "
                           "share no example with their training splits"]
    if overlaps:
        lines.append("The choice read those training examples without noise: neither the per-run ε nor the ε of "
                     "the selection covers them.")
    return lines


def _attach_sweep(report: Report, sweep: dict[str, Any]) -> None:
    if sweep.get("selection"):
        report.selection.insert(0, f"The arms' values (sweep file): {sweep['selection'].strip()}")
    by_key: dict[CellKey, list[Cell]] = defaultdict(list)
    for c in report.cells:
        by_key[c.key].append(c)
    for spec in sweep.get("compare") or []:
        for cell in report.cells:
            if cell.method != spec["method"]:
                continue
            eps = float(spec.get("baseline_epsilon", cell.epsilon))
            bases = by_key.get((cell.task, cell.model, spec["baseline"], eps), [])
            same = [b for b in bases if b.variant == cell.variant] or (bases if len(bases) == 1 else [])
            if len(same) == 1:  # a baseline split into several variants has no single difference
                report.comparisons.append(Comparison(cell, same[0]))
    compared = defaultdict(list)
    for c in report.comparisons:
        compared[(c.cell.key, c.baseline.method)].append(c)
    used = []
    for ref in sweep.get("reference") or []:
        key = (ref["task"], ref["model"], ref["method"], float(ref["epsilon"]))
        source = ref.get("source", sweep.get("reference_source"))
        targets = compared.get((key, ref["baseline"]), []) if "baseline" in ref else by_key.get(key, [])
        for target in targets:
            target.reference = float(ref["value"])
            target.reference_convention = ref.get("convention", sweep.get("reference_convention"))
            if isinstance(target, Cell):
                target.source = source
        used += [source] if targets and source not in used else []
    report.sources = used
    present = set(by_key)
    expected = dict.fromkeys((j["task"], j["model"], job_method(j), privacy_epsilon(j["privacy"]))
                             for j in sweep_jobs(sweep))
    report.missing = [key for key in expected if key not in present]


def log_to_wandb(report: Report, out: Path, project: str = "dpft", entity: str | None = None,
                 offline: bool = True) -> Path:
    """The report as a W&B run of its own (job type "report", the table's group): the rows as a Table, the
    missing cells as another, the plot as an image. Returns the run's folder."""
    import wandb

    group = report.table or "report"
    run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"report-{group}",
                     tags=[group, "report"], dir=str(out), mode="offline" if offline else "online",
                     config={"table": report.table}, reinit="finish_previous")
    rows = report.rows()
    columns = list(rows[0]) if rows else ["task"]
    run.log({
        "report/table": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
        "report/missing": wandb.Table(columns=["task", "model", "method", "epsilon"],
                                      data=[[t, m, meth, _eps(e)] for t, m, meth, e in report.missing]),
        "report/privacy_utility": wandb.Image(str(out / "privacy_utility.png")),
    })
    run.summary.update({"report/cells": len(report.cells), "report/missing": len(report.missing),
                        "report/failed": len(report.failed), "report/selection": "\n".join(report.selection)})
    folder = Path(run.dir).parent
    run.finish()
    return folder


def report(folder: Path | None = None, out: Path | None = None, table: str | None = None,
           sweep: dict[str, Any] | None = None, wandb_path: str | None = None, api: Any = None,
           log_wandb: dict[str, Any] | None = None) -> Report:
    """Load (a results folder, or a W&B project), build, write into `out` (default: the folder), and
    optionally log the report to W&B (`log_wandb`: project, entity, offline)."""
    if (folder is None) == (wandb_path is None):
        raise ValueError("give a results folder or a W&B project (--wandb entity/project), one of them")
    sweep = sweep or (load_sweep(table) if table else None)
    if wandb_path:
        results = load_wandb(wandb_path, sweep["table"] if sweep else None, api=api)
    elif not Path(folder).is_dir():
        raise ValueError(f"results folder {folder} does not exist (run the table first: make table-<name>)")
    else:
        results = load_local(folder)
    result = build(results, sweep)
    out = Path(out or folder)
    result.write(out)
    if log_wandb:
        log_to_wandb(result, out, **log_wandb)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", help="folder searched recursively for results.json")
    parser.add_argument("--table", help="sweep name in sweeps/ or a sweep file (references, expected cells)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the results folder)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs of a W&B project instead of files")
    parser.add_argument("--log-wandb", metavar="[ENTITY/]PROJECT", nargs="?", const="dpft",
                        help="log the report as a W&B run (offline unless --online; default project dpft)")
    parser.add_argument("--online", action="store_true", help="with --log-wandb: upload now instead of offline")
    args = parser.parse_args(argv)
    if args.wandb and args.out is None:
        parser.error("--wandb needs --out (where to write the tables and the plot)")
    log = None
    if args.log_wandb:
        entity, _, project = args.log_wandb.rpartition("/")
        log = {"project": project, "entity": entity or None, "offline": not args.online}
    try:
        result = report(args.folder, args.out, args.table, wandb_path=args.wandb, log_wandb=log)
    except ValueError as err:
        parser.error(str(err))
    print(result.markdown())
    for line in result.environments:
        print(f"dpft-report: warning: a cell pools runs of different environments: {line}", file=sys.stderr)
    print(f"{len(result.cells)} cells, {len(result.missing)} missing, {len(result.failed)} failed; "
          f"written to {args.out or args.folder}")


if __name__ == "__main__":
    main()
