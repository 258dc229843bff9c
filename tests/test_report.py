"""Sweeps compose into their jobs; the report's cells, means, standard errors, references, comparisons,
search selection and missing list; the W&B reading path; the launcher configs."""

from __future__ import annotations

import csv
import itertools
import math
import os
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dpft.config import CONFIG_DIR
from dpft.report.collect import build, load_local, load_wandb, report
from dpft.report.sweeps import (
    SWEEPS_DIR,
    blocks,
    commands,
    job_method,
    jobs,
    load_sweep,
    privacy_epsilon,
    restrict,
    search_keys,
)
from dpft.results import flat_summary, results_from_summary, write_results
from tests.conftest import compose_config, requires_data

GROUPS = ("model", "task", "method", "privacy", "trainer")
PARSER = OverridesParser.create()


# --- sweep files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,count", [("cpu", 33), ("demo", 6), ("dpzero_roberta", 216), ("dpzero_opt", 144), ("dpzo_opt", 612),
                                        ("dpzoso_roberta", 210), ("anadp_roberta", 84), ("dr_encoder", 60),
                                        ("dr_encoder_cpu", 7)])
def test_every_sweep_composes_into_its_jobs(name, count):
    sweep = load_sweep(name)
    all_jobs = jobs(sweep)
    assert len(all_jobs) == count
    assert len({tuple(sorted(j.items())) for j in all_jobs}) == count  # no job twice
    cmds = commands(sweep)
    assert len(cmds) == len(blocks(sweep))
    # each command sweeps exactly its block's jobs (comma lists multiply out to the job count)
    swept = [math.prod(len(a.split("=", 1)[1].split(",")) for a in cmd if "," in a.split("=", 1)[-1]
                       and not a.startswith("hydra.")) for cmd in cmds]
    assert sum(swept) == count
    # every job composes (as `--multirun --cfg job` would), and its overrides land in the config; jobs that
    # differ only in seeds compose alike, so one per seed-free combination is composed
    composed = {}
    for job in all_jobs:
        key = tuple(sorted((k, v) for k, v in job.items() if k not in ("seed", "task.data_seed")))
        if key not in composed:
            composed[key] = compose_config([f"{k}={v}" for k, v in job.items()], shrink=False)
        cfg = composed[key]
        assert cfg.method.name == job_method(job) and cfg.privacy.name == job["privacy"]
        assert cfg.model.name == job.get("model", cfg.model.name) and cfg.task.name == job.get("task", cfg.task.name)
        for k, v in job.items():
            if k not in GROUPS and k not in ("seed", "task.data_seed"):
                assert OmegaConf.select(cfg, k) == PARSER.parse_override(f"{k}={v}").value(), (name, k)
        cpu = name in ("cpu", "demo") or name.endswith("_cpu")  # the tables that run on a CPU
        assert cfg.trainer.accelerator == ("cpu" if cpu else "gpu")


@pytest.mark.parametrize("name,count", [("cpu", 147), ("demo", 6), ("dpzero_roberta", 1656), ("dpzero_opt", 684), ("dpzo_opt", 4230),
                                        ("dpzoso_roberta", 930), ("anadp_roberta", 1200), ("dr_encoder", 96),
                                        ("dr_encoder_cpu", 7)])
def test_search_grids_expand_to_their_jobs_and_keep_the_chosen_ones(name, count):
    """`--search` runs the papers' grids (the README's counts); the arms' chosen values are among them, spelled
    alike, so a table's finished cells count for the search too."""
    sweep = load_sweep(name)
    searched = {tuple(sorted(j.items())) for j in jobs(sweep, search_keys(sweep))}
    assert len(searched) == len(jobs(sweep, search_keys(sweep))) == count
    assert {tuple(sorted(j.items())) for j in jobs(sweep)} <= searched


def test_sweep_files_load_and_their_references_name_expected_cells():
    names = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    assert names == ["anadp_roberta", "cpu", "demo", "dpzero_opt", "dpzero_roberta", "dpzo_opt", "dpzoso_roberta",
                     "dr_encoder", "dr_encoder_cpu", "dr_encoder_llama"]
    for name in names:
        sweep = load_sweep(name)
        expected = {(j["task"], j["model"], job_method(j), privacy_epsilon(j["privacy"])) for j in jobs(sweep)}
        for ref in sweep.get("reference", []):
            assert (ref["task"], ref["model"], ref["method"], float(ref["epsilon"])) in expected, (name, ref)
            assert ref.get("source", sweep.get("reference_source"))
            if "baseline" in ref:
                assert any(c["method"] == ref["method"] and c["baseline"] == ref["baseline"] for c in sweep["compare"])


def test_reference_values_are_the_papers_numbers():
    """Spot checks against the papers (DESIGN.md / methods.md): one value per table and column kind."""
    def value(name, task, model, method, eps):
        return next(r["value"] for r in load_sweep(name)["reference"]
                    if (r["task"], r["model"], r["method"], float(r["epsilon"])) == (task, model, method, eps))

    assert value("dpzero_roberta", "mnli-k512", "roberta-large", "dpsgd_lora", 2) == 65.7
    assert value("dpzero_roberta", "trec-k512", "roberta-large", "ft", math.inf) == 95.9
    assert value("dpzero_opt", "squad", "opt-6.7b", "dpzero", 6) == 79.5
    assert value("dpzero_opt", "squad", "opt-6.7b", "zero_shot", math.inf) == 36.5
    assert value("dpzero_opt", "boolq", "opt-2.7b", "mezo", math.inf) == 65.3
    assert value("dpzo_opt", "squad", "opt-66b", "mezo_prefix", math.inf) == 85.0  # MeZO Table 20: prefix only
    assert not any((r["model"], r["task"], r["method"]) == ("opt-66b", "squad", "mezo")
                   for r in load_sweep("dpzo_opt")["reference"])  # full-parameter MeZO there is "*"
    assert value("dpzo_opt", "squad", "opt-66b", "dpzo", 1) == -1.86
    assert value("dpzoso_roberta", "mnli-k512", "roberta-large", "dpzopo", 4) == 74.9
    assert value("dpzoso_roberta", "trec-k512", "roberta-large", "dpzopo", 4) == 92.0
    assert value("dpzoso_roberta", "mnli-k512", "roberta-large", "dpzopo", 8) == 74.8  # as DP-AggZO quotes it
    assert value("dpzoso_roberta", "sst2-k512", "roberta-large", "zero_shot", math.inf) == 79.0
    assert len(load_sweep("dpzero_roberta")["reference"]) == 60 and len(load_sweep("dpzero_opt")["reference"]) == 48
    assert len(load_sweep("dpzoso_roberta")["reference"]) == 70


@requires_data
def test_dpzoso_delta_is_one_over_each_tasks_training_set_size():
    from dpft.data.tasks import build_task

    sweep = load_sweep("dpzoso_roberta")
    for job in jobs(sweep):
        n = len(build_task(job["task"], int(job["task.data_seed"])).splits()["train"])
        assert float(job["privacy.target_delta"]) == pytest.approx(1 / n, rel=1e-12), job["task"]


@pytest.mark.parametrize("text,message", [
    ("arms: [{method: dpzero}]\ncolumns: 3", "unknown keys"),
    ("arms: [{method: dpzeroo}]", "method='dpzeroo' is not one of"),
    ("arms: [{method: dpzero, privacy: [eps3]}]", "privacy='eps3'"),
    ("arms: [{method: mezo}]\nsearch: {dpzero: {method.clip: [1]}}", "search.dpzero: not a method of the arms"),
    ("arms: [{method: mezo}]\nsearch: {mezo: {method.lr: [1e-6, 1e-7]}}",
     "search.mezo.method.lr: the arm must set its chosen value"),
    ("arms: [{method: mezo}]\ncompare: [{method: mezo, baseline: ft}]", "baseline='ft'"),
    ("arms: [{method: mezo}]\nreference: [{task: sst2, model: opt-tiny, method: mezo, epsilon: .inf}]", "missing ['value']"),
    ("arms: [{method: mezo}]\nreference: [{task: sst2, model: opt-tiny, method: mezo, epsilon: .inf, value: 1}]",
     "give its source"),
    ("arms: [{method: mezo}]\ngrid: {seed: [0]}\nwhen: {lr=1: [method.lr=1]}", "when: 'lr=1'"),
    ("arms: [{method: mezo}, {method: mezo, overrides: [method.lr=1]}]", "repeat a method; give the variants a `name:`"),
    ("arms: [{method: mezo}]\nselection: [1]", "selection: [1] should be a sentence saying how"),
    ("arms: [{method: mezo, models: [opt-tiny]}]", "arms: ['models']"),
    ("arms: [{method: mezo, only: {model: [opt-13b]}}]\ngrid: {model: [opt-tiny]}",
     "must be a non-empty subset of grid.model=['opt-tiny']"),
    ("arms: [{method: mezo, only: {task: [sst2]}}]\ngrid: {model: [opt-tiny]}", "only.task=['sst2']"),
])
def test_bad_sweep_files_fail_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_sweep(path)
    with pytest.raises(ValueError, match="unknown table 'nope'.*dpzero_roberta"):
        load_sweep("nope")


def test_an_arm_restricted_to_some_models_runs_on_those_only():
    sweep = load_sweep("dpzo_opt")
    models = {m: {j["model"] for j in jobs(sweep) if j["method"] == m} for m in ("dpsgd", "dpsgd_lora", "dpzo")}
    assert models == {"dpsgd": {"opt-1.3b"}, "dpsgd_lora": {"opt-1.3b", "opt-2.7b", "opt-6.7b"},
                      "dpzo": {"opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"}}
    restrict(sweep, "model=opt-2.7b,opt-13b", None)  # --set: dpsgd has no model left, dpsgd_lora one
    assert {j["method"] for j in jobs(sweep)} == {"mezo", "mezo_prefix", "dpzo", "dpzo_laplace", "dpsgd_lora"}
    assert {j["model"] for j in jobs(sweep) if j["method"] == "dpsgd_lora"} == {"opt-2.7b"}


def test_named_arms_are_variants_of_one_method():
    sweep = load_sweep("dr_encoder_cpu")
    names = {job_method(j) for j in jobs(sweep)}
    assert names == {"fedavg", "dp_fedavg", "dr_encoder_x4", "dr_encoder_x16"}
    x16 = [j for j in jobs(sweep) if job_method(j) == "dr_encoder_x16"]
    assert len(x16) == 2 and all(j["method"] == "dr_encoder" and j["method.encoder.compression"] == "16" for j in x16)
    both, one = load_sweep("dr_encoder_cpu"), load_sweep("dr_encoder_cpu")
    restrict(both, "method=dr_encoder", None)
    restrict(one, "method=dr_encoder_x4", None)
    assert len(jobs(both)) == 4 and {job_method(j) for j in jobs(one)} == {"dr_encoder_x4"}


def test_set_and_search_change_the_grid():
    sweep = load_sweep("dpzero_roberta")
    # the search grid of one key: DPZero's 7 clips instead of the chosen 200, spelled as the arm spells it
    dpzero_jobs = [j for j in jobs(sweep, ["method.clip"]) if j["method"] == "dpzero"]
    assert len(dpzero_jobs) == 36 * 7 and {j["method.clip"] for j in dpzero_jobs} >= {"200", "50", "400"}
    # zero-shot, FT and FT-LoRA × 4 lr, MeZO × 3 lr, DP-AdamW and DP-LoRA × 4 lr × 4 clip, DPZero × 7 clip, DPGD-0th
    assert len(jobs(sweep, search_keys(sweep))) == 18 + 2 * 18 * 4 + 18 * 3 + 2 * 36 * 16 + 36 * 7 + 36
    for item, count in [("method=dpzero", 36), ("privacy=eps2", 72), ("task.data_seed=42", 72)]:
        part = load_sweep("dpzero_roberta")
        assert restrict(part, item, None) is None
        assert len(jobs(part)) == count, item
    part = load_sweep("dpzero_opt")
    searched = restrict(part, "method.clip=10,50", None)
    assert searched == ["method.clip"] and len(jobs(part, searched)) == 144 + 72
    with pytest.raises(ValueError, match="not a key of table dpzero_opt.*task.data_seed"):
        restrict(load_sweep("dpzero_opt"), "method.eps=1", None)


def test_when_splits_the_multirun_on_its_key():
    sweep = load_sweep("dpzoso_roberta")
    deltas = {}
    for block in blocks(sweep):
        assert "task" not in block.dims  # one multirun per task: its δ is a plain override
        deltas[block.overrides["task"]] = float(block.overrides["privacy.target_delta"])
        # δ ≥ 1/n is allowed on the private arms only (privacy=none has no such key)
        private = block.dims.get("privacy", [block.overrides.get("privacy")]) != ["none"]
        assert (block.overrides.get("privacy.allow_large_delta") == "true") == private
    assert deltas == {"sst2-k512": 1 / 1024, "sst5-k512": 1 / 2560, "snli-k512": 1 / 1536, "mnli-k512": 1 / 1536,
                      "trec-k512": 1 / 2646}


# --- the report -------------------------------------------------------------------------------------------
def _fake(folder: Path, method: str, eps: float, seed: int, acc: float, status: str = "completed",
          model: str = "roberta-large", task: str = "sst2-k512", val: float | None = None, clip: float = 1.0,
          data_seed: int = 42, privacy: dict | None = None, lr: float | None = None, cost: dict | None = None,
          communication: dict | None = None, config: dict | None = None, name: str | None = None,
          environment: dict | None = None, as_paper: bool | None = True) -> None:
    metrics = {"test/acc": acc} if val is None else {"test/acc": acc, "val/acc": val}
    results = {"status": status, "method": method, "model": model, "task": task, "seed": seed, "data_seed": data_seed,
               "metrics": metrics, "privacy": {"target_epsilon": eps, "epsilon_spent": eps * 0.99, **(privacy or {})},
               "cost": cost or {}, "config": {"method": {"clip": clip, "lr": lr}, **(config or {})}}
    if as_paper is not None:  # None: a results.json written before the protocol was recorded
        results["protocol"] = {"name": "paper" if as_paper else "dpft", "as_paper": as_paper}
    if communication is not None:
        results["communication"] = communication
    if environment is not None:
        results["environment"] = environment
    if status != "completed":
        results["error"] = "ValueError: out of budget"
    folder = folder / (name or f"{method}-{eps}-{seed}-{data_seed}-{clip}-{lr}-{status}")
    write_results(results, folder / "results.json")


def test_report_means_standard_errors_references_and_missing(tmp_path):
    for seed, acc in enumerate([90.0, 91.0, 93.0]):
        _fake(tmp_path, "dpzero", 2.0, seed, acc)
    _fake(tmp_path, "mezo", math.inf, 0, 92.0)
    _fake(tmp_path, "dpzero", 6.0, 0, 0.0, status="failed")
    out = report(tmp_path, table="dpzero_roberta")
    rows = out.rows()
    row = next(r for r in rows if r["method"] == "dpzero")
    assert row["mean"] == pytest.approx(91.333333)
    assert row["stderr"] == pytest.approx(statistics.stdev([90, 91, 93]) / math.sqrt(3))  # 0.8819
    assert row["reference"] == 91.8 and row["difference"] == pytest.approx(91.333333 - 91.8)
    assert row["epsilon_spent"] == pytest.approx(1.98) and row["reference_source"].endswith("Table 2")
    mezo = next(r for r in rows if r["method"] == "mezo")
    assert mezo["epsilon"] == math.inf and mezo["reference"] == 92.5 and mezo["stderr"] == 0.0
    assert len(out.failed) == 1 and "out of budget" in out.failed[0]["error"]
    assert ("sst5-k512", "roberta-large", "dpzero", 2.0) in out.missing
    assert ("sst2-k512", "roberta-large", "dpzero", 2.0) not in out.missing
    assert len(out.missing) == 72 - 2  # 12 method·ε columns x 6 tasks, two of them present
    table = (tmp_path / "table.md").read_text()
    assert "| 91.3 ± 0.9 | 91.8 | -0.5 |" in table and "Missing cells (70)" in table and "Failed runs (1)" in table
    assert "Paper values: Zhang et al., DPZero (ICML 2024), Table 2." in table
    assert (tmp_path / "table.tex").read_text().count(r"\pm") == 1  # n = 1 (mezo) shows no ±
    assert len((tmp_path / "table.csv").read_text().splitlines()) == 3
    png = tmp_path / "privacy_utility.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100


def test_a_papers_value_beside_runs_that_did_not_read_its_inputs_is_marked(tmp_path):
    """Runs under task.protocol=dpft (or at other lengths, or written before results.json recorded a protocol) are
    a cell of their own, and the paper's value beside it carries † and the footnote; beside the paper-protocol
    cell it does not."""
    for seed in (0, 1):
        _fake(tmp_path, "dpzero", 2.0, seed, 90.0, config={"task": {"protocol": "paper"}}, name=f"paper-{seed}")
        _fake(tmp_path, "dpzero", 2.0, seed, 91.0, config={"task": {"protocol": "dpft"}}, as_paper=False,
              name=f"dpft-{seed}")
    out = report(tmp_path, table="dpzero_roberta")
    rows = {r["variant"]: r for r in out.rows() if r["method"] == "dpzero"}
    assert set(rows) == {"task.protocol=paper", "task.protocol=dpft"}
    assert rows["task.protocol=paper"]["paper_inputs"] and not rows["task.protocol=dpft"]["paper_inputs"]
    assert rows["task.protocol=paper"]["reference"] == rows["task.protocol=dpft"]["reference"] == 91.8
    table = (tmp_path / "table.md").read_text()
    assert "| 90.0 ± 0.0 | 91.8 | -1.8 |" in table and "| 91.0 ± 0.0 | 91.8† | -0.8 |" in table
    assert "† Not the paper's inputs" in table and "docs/protocols.md" in table
    assert (tmp_path / "table.tex").read_text().count(r"$^\dagger$") == 2  # the marked value and the footnote
    with open(tmp_path / "table.csv") as f:
        assert {r["variant"]: r["paper_inputs"] for r in csv.DictReader(f) if r["method"] == "dpzero"} == {
            "task.protocol=paper": "True", "task.protocol=dpft": "False"}
    _fake(tmp_path / "old", "mezo", math.inf, 0, 92.0, as_paper=None)  # no protocol recorded: the dpft inputs
    assert next(r for r in report(tmp_path / "old", table="dpzero_roberta").rows())["paper_inputs"] is False


def test_runs_whose_settings_differ_are_never_pooled_and_the_split_is_named(tmp_path):
    """Two seed-0 DP-ZO runs at ε = 2, one at δ = 0.01 for 5 steps and one at δ = 1e-5 for 20, plus a second seed
    of the latter: two cells (n = 1 and n = 2), the differing keys named; a new output folder or W&B setting does
    not split."""
    short = {"privacy": {"target_delta": 0.01}, "trainer": {"max_steps": 5}, "paths": {"output_dir": "/a"}}
    long = {"privacy": {"target_delta": 1e-5}, "trainer": {"max_steps": 20}}
    _fake(tmp_path, "dpzo", 2.0, 0, 49.0, privacy={"target_delta": 0.01}, config=short, name="short")
    _fake(tmp_path, "dpzo", 2.0, 0, 50.0, privacy={"target_delta": 1e-5}, config={**long, "paths": {"output_dir": "/b"}},
          name="long0")
    _fake(tmp_path, "dpzo", 2.0, 1, 54.0, privacy={"target_delta": 1e-5}, config={**long, "logger": {"offline": False}},
          name="long1")
    out = report(tmp_path)
    cells = sorted((c.variant["privacy.target_delta"], c.variant["trainer.max_steps"], c.values) for c in out.cells)
    assert cells == [(1e-5, 20, [50.0, 54.0]), (0.01, 5, [49.0])]
    table = (tmp_path / "table.md").read_text()
    assert "dpzo / ε=2: 2 cells, the runs differ in privacy.target_delta, trainer.max_steps" in table
    assert "| dpzo [privacy.target_delta=0.01, trainer.max_steps=5] | 2 | 0.01 | 1.98 | 1 | 49.0 |" in table
    assert "52.0 ± 2.0" in table  # n = 2 has its standard error, n = 1 none
    import pandas as pd

    frame = pd.read_csv(tmp_path / "table.csv")
    assert frame["epsilon"].dtype == float and frame["delta"].dtype == float
    assert sorted(frame["delta"]) == [1e-5, 0.01]


def test_a_cell_pooled_from_different_environments_is_flagged_with_what_differs(tmp_path, capsys):
    """Runs that agree in configuration but ran with other package versions or devices still pool (the config is the
    cell), and the report says which cells, and what differed; thread counts and the OS do not count."""
    from dpft.report.collect import main as report_main

    env = {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.25.0", "devices": "NVIDIA H100", "threads": 8,
           "platform": "Linux-a"}
    _fake(tmp_path, "dpzero", 2.0, 0, 90.0, environment=env, name="a")
    _fake(tmp_path, "dpzero", 2.0, 1, 91.0, environment={**env, "transformers": "5.26.0", "devices": "NVIDIA A100"},
          name="b")
    _fake(tmp_path, "mezo", math.inf, 0, 92.0, environment=env, name="c")
    _fake(tmp_path, "mezo", math.inf, 1, 92.5, environment={**env, "threads": 2, "platform": "Linux-b"}, name="d")
    out = report(tmp_path)
    assert [c.values for c in out.cells if c.method == "dpzero"] == [[90.0, 91.0]]
    assert out.environments == ["sst2-k512 / roberta-large / dpzero / ε=2: 2 runs, devices: NVIDIA A100 / NVIDIA "
                                "H100; transformers: 5.25.0 / 5.26.0"]
    assert "different package versions or devices" in (tmp_path / "table.md").read_text()
    report_main([str(tmp_path)])
    assert "dpft-report: warning: a cell pools runs of different environments: sst2-k512 / roberta-large / dpzero" \
        in capsys.readouterr().err


def test_each_cell_carries_its_memory_time_and_communication_costs(tmp_path):
    gib = 2**30
    _fake(tmp_path, "dpzero", 2.0, 0, 90.0, cost={"peak_memory_bytes": 2 * gib, "seconds_per_step": 0.5,
                                                  "wall_seconds": 3600, "forward_passes": 100, "device": "cuda:0, cuda:1"})
    _fake(tmp_path, "dpzero", 2.0, 1, 92.0, cost={"peak_memory_bytes": 4 * gib, "seconds_per_step": 1.5,
                                                  "wall_seconds": 7200, "forward_passes": 300, "device": "cuda:0, cuda:1"})
    _fake(tmp_path, "dp_fedavg", 2.0, 0, 80.0, cost={"peak_memory_bytes": gib, "wall_seconds": 1800, "device": "cpu"},
          communication={"upload_bytes_per_client": 4096})
    out = report(tmp_path)
    with (tmp_path / "table.csv").open() as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    zo, fed = rows["dpzero"], rows["dp_fedavg"]
    assert float(zo["peak_memory_gib"]) == 3.0 and float(zo["seconds_per_step"]) == 1.0
    assert float(zo["device_hours"]) == 2 * (1 + 2) and zo["device"] == "2 GPU"  # both runs, two GPUs each
    assert float(zo["forward_passes"]) == 200 and zo["upload_bytes_per_client_round"] == ""
    assert float(fed["device_hours"]) == 0.5 and fed["device"] == "cpu"
    assert float(fed["upload_bytes_per_client_round"]) == 4096
    table = (tmp_path / "table.md").read_text()
    assert "| peak GiB | s / step | device-hours | forward passes | upload bytes / client-round |" in table
    assert "| 3.00 | 1 | 6 (2 GPU) | 200 | – |" in table
    assert "Memory (GiB) & s/step & Device-h" in (tmp_path / "table.tex").read_text()
    assert (tmp_path / "memory_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.cells[0].costs


def test_report_keeps_the_searched_configuration_with_the_best_validation_metric(tmp_path):
    searched, unvalidated = tmp_path / "searched", tmp_path / "unvalidated"
    for seed in (0, 1):
        _fake(searched, "dpzero", 2.0, seed, acc=80.0 + seed, val=70.0, clip=50.0)   # worse on validation
        _fake(searched, "dpzero", 2.0, seed, acc=60.0 + seed, val=75.0, clip=200.0)  # kept, though worse on test
    out = build(load_local(searched), load_sweep("dpzero_roberta"))
    (cell,) = out.cells
    assert cell.values == [60.0, 61.0] and cell.selected == {"method.clip": 200.0} and cell.tried == 2
    assert "method.clip=200.0 (of 2)" in out.markdown()
    # without the sweep nothing says what was searched: the two clips are two cells, never pooled
    loose = build(load_local(searched))
    assert sorted((c.variant["method.clip"], tuple(c.values)) for c in loose.cells) == [(50.0, (80.0, 81.0)),
                                                                                       (200.0, (60.0, 61.0))]
    assert "sst2-k512 / roberta-large / dpzero / ε=2: 2 cells, the runs differ in method.clip" in loose.markdown()
    # choosing needs a validation metric
    _fake(unvalidated, "dpzero", 2.0, 0, acc=80.0, clip=50.0)
    _fake(unvalidated, "dpzero", 2.0, 0, acc=60.0, clip=200.0)
    with pytest.raises(ValueError, match="no validation metric to choose by: run searches with validate=true"):
        build(load_local(unvalidated), load_sweep("dpzero_roberta"))


def _gaussian(sigma: float, q: float, steps: int, delta: float = 1e-5) -> dict:
    return {"mechanism": "gaussian", "step_noise_multiplier": sigma, "sample_rate": q, "steps": steps,
            "target_delta": delta}


def test_a_searched_cell_reports_the_epsilon_of_all_its_runs_composed(tmp_path):
    """The ε of the selection composes every run the search looked at (configurations × seeds × data seeds),
    checked by hand: identical runs compose to one run of all their steps; heterogeneous ones to the sum of
    their RDP curves; pure-ε runs to the sum of their ε."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    identical = _gaussian(1.1, 64 / 1024, 500)  # 2 clips × 2 seeds × 2 data seeds: 8 runs of 500 steps
    for clip, seed, data_seed in itertools.product((100.0, 200.0), (0, 1), (42, 13)):
        _fake(tmp_path, "dpzero", 2.0, seed, acc=80.0, val=70.0 + clip / 100, clip=clip, data_seed=data_seed,
              privacy=identical)
    # DP-SGD at ε = 6: two configurations of other steps, noise and sampling (e.g. a searched number of steps)
    short, long = _gaussian(0.9, 0.05, 300), _gaussian(1.3, 0.1, 1000)
    for seed in (0, 1):
        _fake(tmp_path, "dpsgd", 6.0, seed, acc=85.0, val=80.0, clip=0.1, privacy=short)
        _fake(tmp_path, "dpsgd", 6.0, seed, acc=86.0, val=81.0, clip=1.0, privacy=long)
    _fake(tmp_path, "dpsgd", 6.0, 2, acc=0.0, clip=1.0, status="failed")
    out = report(tmp_path, table="dpzero_roberta")
    cells = {c.method: c for c in out.cells}

    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(PoissonSampledDpEvent(64 / 1024, GaussianDpEvent(1.1)), 8 * 500))
    expected = accountant.get_epsilon(1e-5)
    dpzero = cells["dpzero"]
    assert (dpzero.selection_epsilon, dpzero.selection_delta, dpzero.selection_runs) == (
        pytest.approx(expected, rel=1e-9), 1e-5, 8)
    orders = rdp.DEFAULT_RDP_ORDERS
    curve = sum(2 * b["steps"] * rdp._compute_rdp_poisson_subsampled_gaussian(b["sample_rate"],
                                                                            b["step_noise_multiplier"], orders)
                for b in (short, long))
    assert cells["dpsgd"].selection_epsilon == pytest.approx(rdp.compute_epsilon(orders, curve, 1e-5)[0], rel=1e-9)
    assert cells["dpsgd"].selection_runs == 4  # the failed run is named, not composed
    # in table.md and table.csv, beside per-run ε, with the bound's name and δ
    table = (tmp_path / "table.md").read_text()
    assert f"| method.clip=200.0 (of 2) | {expected:.3g} (8 runs, δ=1e-05) |" in table
    assert "RDP accountant (PLD for replace-one runs, privacy.convention=paper) at the runs' target δ" in table
    assert "Papernot & Steinke" in table
    assert "sst2-k512 / roberta-large / dpsgd / ε=6: 1 run(s) of the search did not complete" in table
    with (tmp_path / "table.csv").open() as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert float(rows["dpzero"]["selection_epsilon"]) == pytest.approx(expected, rel=1e-9)
    assert rows["dpzero"]["selection_runs"] == "8" and float(rows["dpzero"]["selection_delta"]) == 1e-5

    # pure ε (Laplace): T·log(1 + q(e^{K/b} − 1)) per run, added over the 3 learning rates
    laplace = {"mechanism": "laplace", "noise_multiplier": 50.0, "sample_rate": 16 / 1000, "steps": 200,
               "directions": 1, "target_delta": 0.0}
    for lr in (1e-6, 5e-7, 1e-7):
        _fake(tmp_path / "laplace", "dpzo_laplace", 4.0, 0, acc=50.0, val=40.0 + lr * 1e6, task="sst2",
              model="opt-66b", lr=lr, privacy=laplace)
    (cell,) = build(load_local(tmp_path / "laplace"), load_sweep("dpzo_opt")).cells
    assert cell.selection_epsilon == pytest.approx(3 * 200 * math.log(1 + 16 / 1000 * math.expm1(1 / 50)), rel=1e-12)
    assert cell.selection_delta == 0.0 and cell.selection_runs == 3


@requires_data
def test_a_searched_report_says_where_the_validation_chosen_on_holds_other_seeds_training_data(tmp_path, monkeypatch):
    for clip, data_seed in itertools.product((1.0, 2.0), (42, 13, 21)):
        _fake(tmp_path, "dpzero", 2.0, 0, acc=80.0, val=70.0 + clip, clip=clip, data_seed=data_seed,
              model="minilm-l6", privacy=_gaussian(2.1, 32 / 1024, 1000))

    def sentences(seed: int, split: str) -> set[str]:  # the LM-BFF files read by hand (sentence<TAB>label)
        path = Path(os.environ["DPFT_DATA_DIR"]) / "SST-2" / "k-shot-1k-test" / f"512-{seed}" / f"{split}.tsv"
        return {line.split("\t")[0] for line in path.read_text().splitlines()[1:]}

    held = {(s, t): len(sentences(s, "dev") & sentences(t, "train")) for s in (42, 13, 21) for t in (42, 13, 21)}
    assert held[(42, 13)] == 10 and held[(42, 21)] == 14 and held[(42, 42)] == 0  # the figures of the issue
    lines = build(load_local(tmp_path), load_sweep("cpu")).selection
    assert ("sst2-k512: data seed 42's validation split (chosen on) holds training examples of data seed 13 "
            f"({held[(42, 13)]}), data seed 21 ({held[(42, 21)]})") in lines
    assert ("sst2-k512: data seed 13's validation split (chosen on) holds training examples of data seed 21 "
            f"({held[(13, 21)]}), data seed 42 ({held[(13, 42)]})") in lines
    assert any("read those training examples without noise" in line for line in lines)
    assert lines[0].startswith("The arms' values (sweep file): chosen on data seed 42's validation split")
    monkeypatch.delenv("DPFT_DATA_DIR")
    without = build(load_local(tmp_path), load_sweep("cpu")).markdown()
    assert "not checked: no local data (set DPFT_DATA_DIR)" in without and "holds training examples" not in without


def test_report_shows_method_minus_baseline_with_the_papers_difference(tmp_path):
    for seed, (a, b) in enumerate([(70.0, 66.0), (72.0, 67.0)]):
        _fake(tmp_path, "anadp", 4.0, seed, a, model="roberta-base", task="qnli-k512")
        _fake(tmp_path, "dpsgd_lora", 4.0, seed, b, model="roberta-base", task="qnli-k512")
    out = report(tmp_path, table="anadp_roberta")
    (cmp,) = out.comparisons
    assert cmp.difference == pytest.approx(71.0 - 66.5)
    assert cmp.stderr == pytest.approx(math.hypot(statistics.stdev([70, 72]) / math.sqrt(2),
                                                  statistics.stdev([66, 67]) / math.sqrt(2)))
    row = next(r for r in out.rows() if r["method"] == "anadp")
    assert row["vs_baseline"] == pytest.approx(4.5) and row["baseline"] == "dpsgd_lora (ε=4)"
    assert "| qnli-k512 | roberta-base | anadp | dpsgd_lora (ε=4) | 4 | +4.5 ± 1.1 | – | – |" in out.markdown()
    assert "anadp $-$ dpsgd\\_lora" in out.latex()
    # a paper's difference (DP-ZO's headline) sits beside the measured one
    (tmp_path / "dpzo").mkdir()
    _fake(tmp_path / "dpzo", "mezo", math.inf, 0, 85.0, model="opt-66b", task="squad")
    _fake(tmp_path / "dpzo", "dpzo", 1.0, 0, 82.0, model="opt-66b", task="squad")
    out = report(tmp_path / "dpzo", table="dpzo_opt")
    (cmp,) = out.comparisons
    assert cmp.baseline.epsilon == math.inf and cmp.difference == -3.0 and cmp.reference == -1.86
    assert "| -3.0 ± 0.0 | -1.86 | -1.1 |" in out.markdown()
    # the 85.0 on OPT-66B SQuAD is MeZO (prefix): full-parameter MeZO has no reference there (Table 20: "*")
    assert next(c for c in out.cells if c.method == "mezo").reference is None


def test_summary_round_trip_and_the_wandb_reader(tmp_path):
    results = {"method": "dpzo", "model": "opt-tiny", "task": "sst2", "seed": 1, "data_seed": 0, "status": "completed",
               "metrics": {"test/acc": 50.0, "val/acc": 40.0},
               "privacy": {"target_epsilon": 2.0, "epsilon_spent": 1.99, "mechanism": "gaussian"},
               "cost": {"wall_seconds": 3.0}}
    summary = flat_summary(results)
    assert results_from_summary({**summary, "train/loss": 0.3, "_step": 4}) == results
    protocol = {"name": "paper", "reference": "LM-BFF", "max_length": 256, "paper_max_length": 256, "as_paper": True}
    assert results_from_summary(flat_summary({**results, "protocol": protocol})) == {**results, "protocol": protocol}
    assert flat_summary({**results, "protocol": protocol})["protocol/as_paper"] is True

    def run(summary, group="t", job_type="train", state="finished", run_id="a"):
        return SimpleNamespace(summary_metrics=summary, config={"method": {"clip": 0.05}}, group=group,
                               job_type=job_type, state=state, path=["me", "dpft", run_id])

    class FakeApi:
        def __init__(self, runs):
            self._runs, self.calls = runs, []

        def runs(self, path, filters=None):
            self.calls.append((path, filters))
            return [r for r in self._runs if not filters or r.group == filters["group"]]

    nonprivate = {**summary, "method": "mezo", "privacy/target_epsilon": "Infinity", "privacy/mechanism": "none"}
    api = FakeApi([run(summary), run(nonprivate, run_id="b"), run({"_runtime": 3}, state="crashed", run_id="c"),
                   run({"report/cells": 2}, job_type="report", run_id="d"), run(summary, group="other", run_id="e")])
    loaded = load_wandb("me/dpft", "t", api=api)
    assert api.calls == [("me/dpft", {"group": "t"})]
    assert [r["source"] for r in loaded] == ["me/dpft/a", "me/dpft/b", "me/dpft/c"]
    out = build(loaded)
    assert [(c.method, c.epsilon, c.values) for c in out.cells] == [("dpzo", 2.0, [50.0]), ("mezo", math.inf, [50.0])]
    assert out.failed == [{"path": "me/dpft/c", "error": "crashed: no results in the run summary (W&B state crashed)"}]
    assert loaded[0]["config"] == {"method": {"clip": 0.05}}
    # a cell run again is one job (same output folder): its newest completed run counts, a later crash does not
    failed = {**summary, "status": "failed", "error": "NonFiniteLossError: ..."}
    again = {**summary, "test/acc": 60.0}
    cell = {"method": {"clip": 0.05}, "paths": {"output_dir": "logs/tables/t/method=dpzo,seed=1"}}
    reruns = [SimpleNamespace(summary_metrics=m, config=cell, group="t", job_type="train", state=state,
                              path=["me", "dpft", i], created_at=f"2026-12-0{day}T00:00:00")
              for m, state, i, day in [(again, "finished", "g", 2), (failed, "failed", "f", 1),
                                       ({"_runtime": 1}, "crashed", "h", 3)]]
    loaded = load_wandb("me/dpft", "t", api=FakeApi(reruns))
    assert [(r["source"], r["metrics"]["test/acc"]) for r in loaded] == [("me/dpft/g", 60.0)]


def test_report_needs_one_source(tmp_path):
    with pytest.raises(ValueError, match="one of them"):
        report()
    with pytest.raises(ValueError, match="one of them"):
        report(tmp_path, wandb_path="me/dpft")
    with pytest.raises(ValueError, match="does not exist"):
        report(tmp_path / "nope")


# --- configs: W&B group and tags, launchers ---------------------------------------------------------------
def test_wandb_logger_groups_a_table_and_tags_each_run():
    cfg = compose_config(["model=opt-tiny", "method=dpzo", "privacy=eps0.5", "table=cpu", "tags=[mine]"], shrink=False)
    assert cfg.logger.group == "cpu" and cfg.logger.offline is True
    assert list(cfg.logger.tags) == ["mine", "cpu", "dpzo", "sst2-k512", "opt-tiny", "eps=0.5"]
    cfg = compose_config(["model=opt-tiny", "method=mezo"], shrink=False)
    assert cfg.logger.group == "sst2-k512-opt-tiny" and list(cfg.logger.tags) == ["mezo", "sst2-k512", "opt-tiny",
                                                                                  "eps=inf"]


def _launcher(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    return launcher


def test_launcher_configs_compose():
    slurm = _launcher("hydra/launcher=slurm")  # no local config: Slurm's defaults, one task, one GPU
    assert slurm["_target_"].endswith("SlurmLauncher") and slurm["partition"] is None and slurm["account"] is None
    assert slurm["tasks_per_node"] == 1 and slurm["gres"] == "gpu:1" and slurm["nodes"] == 1
    local = _launcher("hydra/launcher=slurm", "local=example")
    example = OmegaConf.load(CONFIG_DIR / "local" / "example.yaml").slurm
    assert local["partition"] == example.partition and local["account"] == example.account
    assert local["gres"] == f"gpu:{example.gpu_type}:1" and local["setup"] == list(example.setup)
    multi = _launcher("hydra/launcher=slurm_multigpu", "trainer.devices=4", "local=example")
    assert multi["tasks_per_node"] == 4 and multi["gres"] == f"gpu:{example.gpu_type}:4"
    joblib = _launcher("hydra/launcher=parallel", "hydra.launcher.n_jobs=3")
    assert joblib["_target_"].endswith("JoblibLauncher") and joblib["n_jobs"] == 3
    assert _launcher("hydra/launcher=parallel")["n_jobs"] == 2
    for name, config in [("joblib", "parallel"), ("slurm", "slurm"), ("slurm_multigpu", "slurm_multigpu")]:
        assert f"hydra/launcher={config}" in commands(load_sweep("cpu"), name)[0]
    assert not any(a.startswith("hydra/launcher") for a in commands(load_sweep("cpu"))[0])


def test_slurm_submits_one_array_per_model_with_its_gpus():
    """dpzo_opt sweeps OPT-1.3B … 66B: under Slurm each model is its own multirun, so its job array asks for
    the GPUs its weights need (one, two for OPT-66B); the jobs themselves are the same."""
    sweep = load_sweep("dpzo_opt")
    local, slurm = commands(sweep), commands(sweep, "slurm")
    per_model = [[a for a in c if a.startswith("model=")] for c in slurm]
    assert all(len(m) == 1 and "," not in m[0] for m in per_model)
    # one array per (multirun, model it runs on): DP-AdamW runs on OPT-1.3B only, DP-LoRA up to 6.7B
    assert len(slurm) == sum(len(next(a for a in c if a.startswith("model=")).split(",")) for c in local) == 4 * 6 + 1 + 3

    def expand(cmds):
        return sorted(tuple(sorted(job)) for c in cmds for job in _jobs_of(c))
    assert expand(slurm) == expand(local)
    gres = {model: _launcher("hydra/launcher=slurm", f"model={model}")["gres"] for model in ("opt-1.3b", "opt-66b")}
    assert gres == {"opt-1.3b": "gpu:1", "opt-66b": "gpu:2"}
    assert _launcher("hydra/launcher=slurm", "model=opt-66b", "local=example")["gres"] == "gpu:a100:2"


def _jobs_of(command: list[str]) -> list[list[str]]:
    """The jobs one `--multirun` command line stands for (swept keys are comma lists)."""
    items = [a for a in command if "=" in a and not a.startswith(("hydra", "skip_existing", "table"))]
    choices = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")] for a in items]
    return [list(job) for job in itertools.product(*choices)]
