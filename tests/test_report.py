"""Sweeps compose into their jobs; the report's cells, means, standard errors, references and missing list."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from dpft.report.collect import report
from dpft.report.sweeps import SWEEPS_DIR, commands, jobs, load_sweep
from dpft.results import write_results
from tests.conftest import compose_config, requires_data


@pytest.mark.parametrize("name,count", [("dpzero_roberta", 180), ("cpu", 30)])
def test_every_sweep_composes_into_its_jobs(name, count, tmp_path):
    sweep = load_sweep(name)
    all_jobs = jobs(sweep)
    assert len(all_jobs) == count
    assert len(commands(sweep)) == sum(len(a.get("privacy", ["none"])) for a in sweep["arms"])
    seen = set()
    for job in all_jobs:  # every job is a valid composition (as --multirun --cfg job would check)
        overrides = [f"{k}={v}" for k, v in job.items()]
        key = tuple(sorted(overrides))
        if key in seen:
            continue
        seen.add(key)
        cfg = compose_config(overrides, tmp_path, shrink=False)
        assert cfg.method.name == job["method"] and cfg.privacy.name == job["privacy"]


def test_all_sweep_files_load():
    for path in SWEEPS_DIR.glob("*.yaml"):
        assert jobs(load_sweep(path.stem))


def _fake(folder: Path, method: str, eps: float, seed: int, acc: float, status: str = "completed") -> None:
    results = {"status": status, "method": method, "model": "roberta-large", "task": "sst2-k512", "seed": seed,
               "metrics": {"test/acc": acc}, "privacy": {"target_epsilon": eps, "epsilon_spent": eps * 0.99}}
    write_results(results, folder / f"{method}-{eps}-{seed}-{status}" / "results.json")


def test_report_means_standard_errors_references_and_missing(tmp_path):
    for seed, acc in enumerate([90.0, 91.0, 93.0]):
        _fake(tmp_path, "dpzero", 2.0, seed, acc)
    _fake(tmp_path, "mezo", math.inf, 0, 92.0)
    _fake(tmp_path, "dpzero", 6.0, 0, 0.0, status="failed")
    out = report(tmp_path, table="dpzero_roberta")
    row = next(r for r in out["rows"] if r["method"] == "dpzero")
    assert row["mean"] == pytest.approx(91.333333)
    assert row["stderr"] == pytest.approx(statistics.stdev([90, 91, 93]) / math.sqrt(3))  # 0.8819
    assert row["reference"] == 91.8 and row["difference"] == pytest.approx(91.333333 - 91.8)
    assert row["epsilon_spent"] == pytest.approx(1.98)
    mezo = next(r for r in out["rows"] if r["method"] == "mezo")
    assert mezo["epsilon"] == "∞" and mezo["reference"] == 92.5 and mezo["stderr"] == 0.0
    assert len(out["failed"]) == 1
    assert ("sst5-k512", "roberta-large", "dpzero", 2.0) in out["missing"]
    assert ("sst2-k512", "roberta-large", "dpzero", 2.0) not in out["missing"]
    assert len(out["missing"]) == 60 - 2  # 10 method·ε columns x 6 tasks, two of them present
    table = (tmp_path / "table.md").read_text()
    assert "91.3 ± 0.9 | 91.8 | -0.5" in table and "Missing cells (58)" in table and "Failed runs (1)" in table
    assert (tmp_path / "table.tex").read_text().count(r"\pm") == 2
    assert len((tmp_path / "table.csv").read_text().splitlines()) == 3
    png = tmp_path / "privacy_utility.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100


@requires_data
def test_tiny_sweep_runs_reports_and_skips_finished_cells(tmp_path):
    from dpft.train import run

    outputs = []
    for method, privacy in [("mezo", "none"), ("dpzo", "eps2"), ("dpzo", "eps8")]:
        for seed in (0, 1):
            cfg = compose_config(["model=opt-tiny", "task=sst2", f"method={method}", f"privacy={privacy}",
                                  f"seed={seed}", "skip_existing=true"], tmp_path / f"{method}-{privacy}-{seed}")
            run(cfg)
            outputs.append(cfg)
    out = report(tmp_path)
    assert len(out["rows"]) == 3 and all(r["n"] == 2 for r in out["rows"])
    dpzo2 = next(r for r in out["rows"] if r["epsilon"] == "2")
    values = [json.loads((Path(c.paths.output_dir) / "results.json").read_text())["metrics"]["test/acc"]
              for c in outputs[2:4]]
    assert dpzo2["mean"] == pytest.approx(statistics.fmean(values))
    # re-running a finished cell skips it: the file is not rewritten
    path = Path(outputs[0].paths.output_dir) / "results.json"
    before = path.stat().st_mtime_ns
    assert run(outputs[0])["status"] == "completed"
    assert path.stat().st_mtime_ns == before
