"""End to end through the real entry point: compose -> fit -> test -> results.json (and the CLI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpft.results import read_results
from dpft.train import run
from dpft.validation import ConfigError
from tests.conftest import requires_data

pytestmark = requires_data

REQUIRED = {"method", "model", "task", "seed", "config", "metrics", "privacy", "cost", "status"}
PRIVACY_KEYS = {"target_epsilon", "target_delta", "epsilon_spent", "noise_multiplier", "sample_rate",
                "expected_batch_size", "steps", "clip", "mechanism", "accountant"}
COST_KEYS = {"wall_seconds", "seconds_per_step", "forward_passes", "peak_memory_bytes"}


def _reject(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


def _read(cfg) -> dict:
    """results.json parsed as strict JSON (no bare Infinity/NaN), then as dpft reads it back."""
    path = Path(cfg.paths.output_dir) / "results.json"
    json.loads(path.read_text(), parse_constant=_reject)
    return read_results(path)


def test_results_json_is_strict_json_readable_by_the_group(make_cfg):
    """Infinity (a non-private run's target ε) is written as the string "Infinity"; the file is not 0600."""
    import os

    umask = os.umask(0o022)
    try:
        cfg = make_cfg("model=opt-tiny", "task=sst2", "method=zero_shot", "trainer.limit_test_batches=1")
        run(cfg)
    finally:
        os.umask(umask)
    path = Path(cfg.paths.output_dir) / "results.json"
    raw = json.loads(path.read_text(), parse_constant=_reject)
    assert raw["privacy"]["target_epsilon"] == "Infinity" and math.isinf(read_results(path)["privacy"]["target_epsilon"])
    assert path.stat().st_mode & 0o777 == 0o644


def _check_complete(results: dict, method: str, steps: int, metric: str = "acc") -> None:
    assert REQUIRED <= set(results)
    assert PRIVACY_KEYS <= set(results["privacy"]) and COST_KEYS <= set(results["cost"])
    assert results["method"] == method and results["status"] == "completed"
    assert math.isinf(results["privacy"]["target_epsilon"]) and results["privacy"]["noise_multiplier"] == 0
    assert results["privacy"]["steps"] == steps
    assert 0.0 <= results["metrics"][f"test/{metric}"] <= 100.0
    assert results["cost"]["peak_memory_bytes"] > 0 and results["cost"]["wall_seconds"] > 0
    # on a CPU machine: the process's peak RSS, named as the one device used
    assert results["cost"]["peak_memory_bytes_by_device"] == {"cpu": results["cost"]["peak_memory_bytes"]}
    assert results["cost"]["device"] == "cpu"


@pytest.mark.parametrize("model,task", [("opt-tiny", "sst2"), ("roberta-tiny", "sst2-k16")])
@pytest.mark.parametrize("method,passes_per_step", [("zero_shot", None), ("ft", 1), ("mezo", 2)])
def test_each_method_runs_and_writes_complete_results(make_cfg, model, task, method, passes_per_step):
    cfg = make_cfg(f"model={model}", f"task={task}", f"method={method}")
    results = run(cfg)
    on_disk = _read(cfg)
    steps = 0 if passes_per_step is None else 3
    _check_complete(on_disk, method, steps)
    assert on_disk["metrics"] == results["metrics"]
    assert on_disk["cost"]["forward_passes"] == (passes_per_step or 0) * steps
    assert "val/acc" in on_disk["metrics"]
    assert on_disk["config"]["model"]["name"] == model


def test_generation_task_reports_f1_and_em(make_cfg):
    cfg = make_cfg("model=opt-tiny", "task=squad", "method=mezo", "task.max_new_tokens=4",
                   "trainer.limit_test_batches=1", "trainer.limit_val_batches=1")
    results = run(cfg)
    _check_complete(results, "mezo", 3, metric="f1")
    assert {"test/f1", "test/em", "val/f1"} <= set(results["metrics"])


def test_multiple_choice_task_trains_lm_style(make_cfg):
    results = run(make_cfg("model=opt-tiny", "task=copa", "method=ft"))
    _check_complete(results, "ft", 3)


@pytest.mark.parametrize("model,method", [("opt-tiny", "mezo_lora"), ("roberta-tiny", "ft_lora"),
                                          ("opt-tiny", "mezo_prefix")])
def test_peft_variants_train_only_adapter_weights(make_cfg, model, method):
    task = "sst2" if model == "opt-tiny" else "sst2-k16"
    results = run(make_cfg(f"model={model}", f"task={task}", f"method={method}"))
    _check_complete(results, method, 3)
    assert 0 < results["cost"]["params_trainable"] < results["cost"]["params_total"] / 10


def test_same_seed_same_results(make_cfg, tmp_path):
    a = run(make_cfg("model=opt-tiny", "task=sst2", "method=mezo", "seed=3"))
    b = run(make_cfg("model=opt-tiny", "task=sst2", "method=mezo", "seed=3"))
    assert a["metrics"] == b["metrics"]


def test_minilm_classifier_fine_tunes(make_cfg):
    results = run(make_cfg("model=minilm-l6", "task=sst2-k16", "method=ft"))
    _check_complete(results, "ft", 3)


@pytest.mark.parametrize("model,task,message", [
    ("roberta-tiny", "squad", "needs a causal LM"),
    ("minilm-l6", "copa", "needs a causal LM"),
    ("roberta-tiny", "wic", "no masked-LM"),
])
def test_impossible_model_task_pairs_fail_with_the_fix(make_cfg, model, task, message):
    cfg = make_cfg(f"model={model}", f"task={task}", "method=ft")
    with pytest.raises(ValueError, match=message):
        run(cfg)
    failed = _read(cfg)  # the cell is recorded as failed, with the error, so a sweep can list it
    assert failed["status"] == "failed" and message in failed["error"]["message"]
    assert (failed["method"], failed["model"], failed["task"]) == ("ft", model, task)
    assert "metrics" not in failed


def test_missing_data_names_file_variable_and_hub_before_anything_loads(make_cfg):
    """A user's setup, not a failed cell: refused before work, no results.json for a report to list."""
    cfg = make_cfg("model=opt-tiny", "task=boolq", "method=ft")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    text = str(err.value)
    assert "BoolQ/train.jsonl" in text and "DPFT_DATA_DIR" in text and "super_glue/boolq" in text
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


# --- the command line, as users type it -----------------------------------------------------------
CLI_SHRINK = ["model=opt-tiny", "task=sst2-k16", "trainer.max_steps=2", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "method.batch_size=4", "trainer.enable_progress_bar=false"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPFT_LOG_DIR": str(cwd / "logs")}
    return subprocess.run([sys.executable, "-m", "dpft.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_cfg_job_prints_the_composed_config(tmp_path):
    out = _cli("model=opt-tiny", "method=mezo", "seed=3", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: mezo" in out.stdout and "seed: 3" in out.stdout and "kind: causal_lm" in out.stdout


def test_cli_run_dir_and_multirun_with_wandb_offline(tmp_path):
    run_dir = tmp_path / "single"
    out = _cli(*CLI_SHRINK, "method=mezo", "logger=csv", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["method"] == "mezo"
    assert "| mezo | opt-tiny | sst2-k16 |" in out.stdout

    sweep_dir = tmp_path / "sweep"
    out = _cli("--multirun", *CLI_SHRINK, "method=ft,mezo", "logger=wandb", f"hydra.sweep.dir={sweep_dir}",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = sorted(sweep_dir.rglob("results.json"))
    assert len(results) == 2
    run_ids = set()
    for path in results:
        data = json.loads(path.read_text())
        runs = list((path.parent / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # one W&B run per job, each finished in its own folder
        run_ids.add(runs[0].name.rsplit("-", 1)[-1])
        # the run's summary carries the results block (the offline log holds its keys verbatim)
        log = next(runs[0].glob("*.wandb")).read_bytes()
        assert b"privacy/target_epsilon" in log and b"cost/seconds_per_step" in log
        assert data["method"] in ("ft", "mezo")
    assert len(run_ids) == 2


# what no user can act on; each was printed by a plain run before it was silenced
NOISE = ("💡 Tip", "LeafSpec", "was configured so 100% of the batches", "failed to converge", "LOAD REPORT",
         "Loading weights", "in eval mode", "is_gradient_checkpointing", "smaller than the logging interval")


def test_a_run_prints_no_library_noise_and_train_log_keeps_the_run(tmp_path):
    """A private LoRA run (dp-accounting, peft, Lightning) and a head-only one on the pretrained MiniLM (its
    encoder frozen in eval mode, its unused pooler weights): the console holds what a user acts on, and train.log
    the run's messages and its results table."""
    runs = {"lora": ["model=opt-tiny", "method=dpsgd_lora", "privacy=eps8"],
            "head": ["model=minilm-l6", "method=dpsgd", "privacy=eps8", "method.trainable=head",
                     "model.cache_features=false"]}
    for name, overrides in runs.items():
        run_dir = tmp_path / name
        out = _cli(*CLI_SHRINK, *overrides, "logger=csv", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        console = out.stdout + out.stderr
        assert [n for n in NOISE if n in console] == [], console
        log = (run_dir / "train.log").read_text()
        assert "[dpft][INFO] - privacy: PrivacySpec(" in log
        assert "`Trainer.fit` stopped: `max_steps=2` reached." in log  # Lightning's own messages
        assert "| method | model | task |" in log and f"run folder: {run_dir}" in log
        assert f"run folder: {run_dir}" in out.stdout


def test_the_progress_bar_counts_steps_not_epochs(make_cfg, tmp_path):
    from dpft.train import StepProgressBar, build_trainer

    cfg = make_cfg("model=opt-tiny", "task=sst2", "method=mezo", "trainer.max_steps=7", "trainer.enable_progress_bar=true")
    trainer = build_trainer(cfg, tmp_path, False, [], validate=False)
    bar = trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    bar.setup(trainer, None, "fit")  # what fit() does: attaches the trainer
    assert bar._get_train_description(0) == "Steps (of 7)"
