"""A tiny table end to end, as users run it: `dpft-sweep <file>` (a subprocess) trains 2 methods × 2 ε × 2
seeds of opt-tiny, each job in its own offline W&B run, then the report (files and its own W&B run);
re-running skips finished cells; the same report from W&B; the notebook on these results; the Slurm
launcher submitting a whole table (to a fake sbatch)."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpft.report.collect import load_local, report
from dpft.report.collect import main as report_main
from tests.conftest import requires_data

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "privacy_utility.ipynb"
# ε=4 is in the file but not run (--set privacy=eps2,eps8): the report of the whole file lists it as missing
TINY_SWEEP = """\
table: tiny
description: 2 methods × 2 ε × 2 (data) seeds of opt-tiny, a few steps
fixed: [model=opt-tiny, task=sst2, task.num_train=24, task.num_dev=8, task.num_test=16, trainer.max_steps=2,
        trainer.limit_test_batches=2, method.batch_size=4, method.eval_batch_size=8,
        trainer.enable_progress_bar=false, validate=false]
grid:
  task.data_seed: [0, 1]
arms:
  - {method: dpzo, privacy: [eps2, eps4, eps8]}
  - {method: dpzero, privacy: [eps2, eps8]}
reference_source: made up for this test
reference:
  - {task: sst2, model: opt-tiny, method: dpzo, epsilon: 2, value: 50.0}
"""


def _sweep(*args: str, log_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPFT_LOG_DIR": str(log_dir), "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dpft.report.run_table", *args], cwd=log_dir.parent, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not os.environ.get("DPFT_DATA_DIR"):
        pytest.skip("needs the local data mirror (set DPFT_DATA_DIR=../shared/data)")
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.yaml").write_text(TINY_SWEEP)
    out = _sweep(str(root / "tiny.yaml"), "--set", "privacy=eps2,eps8", log_dir=root / "logs")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return SimpleNamespace(root=root, sweep=root / "tiny.yaml", folder=root / "logs" / "tables" / "tiny",
                           stdout=out.stdout)


@requires_data
def test_the_demo_table_runs_small_and_prints_its_table_and_plot(tmp_path):
    """`make demo` (dpft-sweep demo) with two training steps and two test batches per job: every cell of the
    committed demo sweep is reported, private cells within their budget, and the report and plot paths printed."""
    overrides = ["method.steps=2", "trainer.limit_test_batches=2", "method.eval_batch_size=8", "logger=none"]
    out = _sweep("demo", *overrides, log_dir=tmp_path / "logs")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    folder = tmp_path / "logs" / "tables" / "demo"
    assert "table demo: 6 jobs in 4 multiruns" in out.stdout
    assert f"report: {folder}/table.md (also .csv, .tex); plot: {folder}/privacy_utility.png" in out.stdout
    with (folder / "table.csv").open() as handle:
        rows = {(r["method"], float(r["epsilon"])): r for r in csv.DictReader(handle)}
    assert set(rows) == {("zero_shot", math.inf), ("ft", math.inf), ("dpsgd", 2.0), ("dpsgd", 8.0), ("dpzo", 2.0),
                         ("dpzo", 8.0)}
    for (method, eps), row in rows.items():
        if eps < math.inf:
            assert 0 < float(row["epsilon_spent"]) <= eps, (method, eps)
        assert row["seconds_per_step"] or method == "zero_shot"
        assert float(row["peak_memory_gib"]) > 0
    assert (folder / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = {p: p.stat().st_mtime_ns for p in folder.glob("*/results.json")}
    again = _sweep("demo", *overrides, log_dir=tmp_path / "logs")  # rerun: every cell is done, none runs again
    assert again.returncode == 0 and len(written) == 6
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*/results.json")} == written


def _jobs(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("*/results.json"))


@requires_data
def test_tiny_table_cells_means_standard_errors_reference_and_plot(tiny):
    jobs = _jobs(tiny.folder)
    assert [j.name for j in jobs] == [f"method={m},privacy={p},task.data_seed={s}" for m in ("dpzero", "dpzo")
                                      for p in ("eps2", "eps8") for s in (0, 1)]
    assert "table tiny: 8 jobs in 1 multiruns" in tiny.stdout
    # by hand, from the jobs' results.json
    by_cell = defaultdict(list)
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        by_cell[(results["method"], results["privacy"]["target_epsilon"])].append(results["metrics"]["test/acc"])
    with (tiny.folder / "table.csv").open() as handle:
        rows = {(r["method"], float(r["epsilon"])): r for r in csv.DictReader(handle)}
    assert set(rows) == {("dpzo", 2.0), ("dpzo", 8.0), ("dpzero", 2.0), ("dpzero", 8.0)} == set(by_cell)
    for key, values in by_cell.items():
        assert len(values) == 2 and int(rows[key]["n"]) == 2
        assert float(rows[key]["mean"]) == pytest.approx(statistics.fmean(values))
        assert float(rows[key]["stderr"]) == pytest.approx(statistics.stdev(values) / math.sqrt(2))
        assert float(rows[key]["epsilon_spent"]) <= key[1]
    assert any(float(r["stderr"]) > 0 for r in rows.values())  # the seeds differ: the s.e. is exercised
    dpzo2 = rows[("dpzo", 2.0)]
    assert float(dpzo2["reference"]) == 50.0
    assert float(dpzo2["difference"]) == pytest.approx(statistics.fmean(by_cell[("dpzo", 2.0)]) - 50.0)
    assert rows[("dpzero", 2.0)]["reference"] == ""
    md = (tiny.folder / "table.md").read_text()
    mean, se = statistics.fmean(by_cell[("dpzo", 2.0)]), statistics.stdev(by_cell[("dpzo", 2.0)]) / math.sqrt(2)
    # the tiny table runs dpft's prompts (task.protocol=dpft): its reference is marked as not like for like
    assert f"| sst2 | opt-tiny | dpzo | 2 | 1e-05 | 2 | 2 | {mean:.1f} ± {se:.1f} | 50.0† | {mean - 50:+.1f} |" in md
    assert "† Not the paper's inputs" in md
    assert "Missing" not in md and "Paper values: made up for this test." in md  # the run was restricted to ε 2, 8
    png = tiny.folder / "privacy_utility.png"
    import matplotlib.image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).shape[:2] == (480, 600)
    # the whole file's report (dpft-report --table <file> --out): ε=4 of dpzo is missing
    report_main([str(tiny.folder), "--table", str(tiny.sweep), "--out", str(tiny.root / "full")])
    full = (tiny.root / "full" / "table.md").read_text()
    assert "Missing cells (1):\n- sst2 / opt-tiny / dpzo / ε=4\n" in full


@requires_data
def test_rerunning_the_table_skips_finished_cells(tiny):
    before = {job: (job / "results.json").stat().st_mtime_ns for job in _jobs(tiny.folder)}
    out = _sweep(str(tiny.sweep), "--set", "privacy=eps2,eps8", log_dir=tiny.root / "logs")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("it has a completed results.json") == 8
    assert {job: (job / "results.json").stat().st_mtime_ns for job in _jobs(tiny.folder)} == before


# --- W&B ---------------------------------------------------------------------------------------------------
def _offline_run(run_dir: Path) -> dict:
    """The run record (group, tags, job type) and the summary of an offline W&B run, from its .wandb file
    (a LevelDB-style log of protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    out: dict = {"summary": {}}
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first / middle / last
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        if record.WhichOneof("record_type") == "run":
            out.update(group=record.run.run_group, tags=list(record.run.tags), job_type=record.run.job_type)
        elif record.WhichOneof("record_type") == "summary":
            out["summary"].update({item.key: json.loads(item.value_json) for item in record.summary.update})
    return out


@requires_data
def test_each_job_has_its_own_wandb_run_and_the_report_one_of_its_own(tiny):
    run_ids = set()
    for job in _jobs(tiny.folder):
        results = json.loads((job / "results.json").read_text())
        (run_dir,) = (job / "wandb").glob("offline-run-*")
        run_ids.add(run_dir.name)
        run = _offline_run(run_dir)
        eps = results["privacy"]["target_epsilon"]
        assert run["group"] == "tiny" and run["job_type"] == "train"
        assert run["tags"] == ["tiny", results["method"], "sst2", "opt-tiny", f"eps={eps:g}"]
        for key, value in results["summary"].items():  # the summary holds the results block
            assert run["summary"][key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert len(run_ids) == 8
    reports = sorted((tiny.folder / "wandb").glob("offline-run-*"))
    assert reports  # one per dpft-sweep call
    run = _offline_run(reports[0])
    assert (run["group"], run["job_type"], run["summary"]["report/cells"]) == ("tiny", "report", 4)
    table = json.loads(next((reports[0] / "files" / "media" / "table").rglob("table_*.table.json")).read_text())
    with (tiny.folder / "table.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(table["data"]) == len(rows) == 4 and table["columns"] == list(rows[0])
    at = {name: table["columns"].index(name) for name in ("method", "epsilon", "mean")}
    assert sorted((r[at["method"]], float(r[at["epsilon"]]), round(r[at["mean"]], 6)) for r in table["data"]) == \
        sorted((r["method"], float(r["epsilon"]), round(float(r["mean"]), 6)) for r in rows)
    assert next((reports[0] / "files" / "media" / "images").rglob("*.png")).read_bytes()[:4] == b"\x89PNG"


class FakeWandbApi:
    """wandb.Api's `runs(path, filters)` over runs whose summaries are what train.py writes."""

    def __init__(self, runs):
        self._runs, self.paths = runs, []

    def runs(self, path, filters=None):
        self.paths.append(path)
        return [r for r in self._runs if not filters or r.group == filters.get("group")]


@requires_data
def test_report_from_wandb_equals_the_local_one(tiny, tmp_path):
    runs = []
    for index, results in enumerate(load_local(tiny.folder)):
        summary = {"test/loss": 0.7, "trainer/global_step": 2, "_step": 0, **results["summary"]}
        runs.append(SimpleNamespace(summary_metrics=summary, config=results["config"], group="tiny",
                                    job_type="train", state="finished", path=["me", "dpft", f"r{index}"]))
    runs.append(SimpleNamespace(summary_metrics={"report/cells": 4}, config={}, group="tiny", job_type="report",
                                state="finished", path=["me", "dpft", "report"]))
    runs.append(SimpleNamespace(**{**vars(runs[0]), "group": "another-table"}))
    api = FakeWandbApi(runs)
    from_wandb = report(wandb_path="me/dpft", table=str(tiny.sweep), api=api, out=tmp_path / "wandb")
    local = report(tiny.folder, table=str(tiny.sweep), out=tmp_path / "local")
    assert api.paths == ["me/dpft"]
    assert from_wandb.rows() == local.rows() and from_wandb.missing == local.missing == [
        ("sst2", "opt-tiny", "dpzo", 4.0)]
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / "wandb" / name).read_text() == (tmp_path / "local" / name).read_text()


# --- the notebook ------------------------------------------------------------------------------------------
def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)


@requires_data
def test_notebook_runs_top_to_bottom_on_the_tiny_table(tiny):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(  # as papermill injects parameters
        f"RESULTS = {str(tiny.folder)!r}\nTABLE = {str(tiny.sweep)!r}\nMETHODS = ['dpzo', 'dpzero']",
        metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "8 runs -> 4 cells, 1 missing, 0 failed" in text
    markdown = next(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert markdown == report(tiny.folder, table=str(tiny.sweep), out=tiny.root / "nb").markdown()
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the plot and one slice's plot
    assert not any(o.output_type == "error" for o in outputs)


def test_notebook_runs_on_a_fresh_clone_with_its_defaults(tmp_path):
    """No results yet (its default folder does not exist): it says what to run and the cells still run."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    (tmp_path / "notebooks").mkdir()  # the default RESULTS, ../logs/tables/cpu, is then empty
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not any(o.output_type == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "0 runs -> 0 cells, 11 missing, 0 failed" in text
    assert f"No results found in {tmp_path / 'logs' / 'tables' / 'cpu'}" in text and "make table-cpu" in text


def test_report_rows_have_the_frame_columns(tiny):
    from dpft.report.collect import ROW_COLUMNS

    rows = report(tiny.folder, table=str(tiny.sweep), out=tiny.root / "cols").rows()
    assert rows and all(tuple(row) == ROW_COLUMNS for row in rows)


# --- Slurm, without Slurm ----------------------------------------------------------------------------------
@requires_data
def test_slurm_launcher_submits_the_whole_table(tmp_path):
    """LAUNCHER=slurm_multigpu with the example local config: every multirun of the table is submitted at
    once as a job array; a fake `sbatch` keeps the scripts and refuses them (no cluster here)."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(mktemp -p "$FAKE_SBATCH_DIR")"\n'
                                    'echo "sbatch: error: no cluster here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "tiny.yaml").write_text(TINY_SWEEP)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SBATCH_DIR": str(scripts)}
    out = _sweep(str(tmp_path / "tiny.yaml"), "--launcher", "slurm_multigpu", "trainer=ddp", "trainer.devices=2",
                 "local=example",
                 "logger=none",
                 log_dir=tmp_path / "logs", env=env)
    assert out.returncode == 1 and "(2 of 2 multiruns failed)" in out.stdout  # the report is still written
    submitted = sorted(p.read_text() for p in scripts.iterdir())
    assert len(submitted) == 2  # one job array per multirun: dpzo × 3 ε, dpzero × 2 ε, × 2 seeds
    assert sorted(s.split("#SBATCH --array=")[1].split("%")[0] for s in submitted) == ["0-3", "0-5"]
    for script in submitted:
        for line in ("--partition=gpu", "--account=my-project", "--gres=gpu:a100:2", "--ntasks-per-node=2",
                     "--nodes=1", "--time=1440", "--mem=64GB", "--cpus-per-task=8", "--signal=USR2@300"):
            assert f"#SBATCH {line}\n" in script, line
        assert "export DPFT_DATA_DIR=$HOME/shared/data" in script
