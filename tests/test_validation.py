"""Every user-facing value that can be wrong fails before training with the key and the valid range."""

from __future__ import annotations

import pytest

import dpft.train
import dpft.validation
from dpft.train import run
from dpft.validation import ConfigError, validate_config
from tests.conftest import compose_config, requires_data

# (overrides, the message must contain) — checked by validate_config, before any data or model is read
BEFORE_DATA = [
    (["seed=-1"], "seed=-1 is invalid: must be an integer >= 0"),
    (["method.lr=-1e-3"], "method.lr=-0.001 is invalid: must be a finite number >= 0"),
    (["method.lr=nan"], "method.lr=nan is invalid"),
    (["method.lr=inf"], "method.lr=inf is invalid"),
    (["method.weight_decay=-1"], "method.weight_decay=-1 is invalid"),
    (["method.batch_size=0"], "method.batch_size=0 is invalid: must be an integer >= 1"),
    (["method.batch_size=2.5"], "method.batch_size=2.5 is invalid"),
    (["method.eval_batch_size=0"], "method.eval_batch_size=0 is invalid"),
    (["trainer.max_steps=-2"], "trainer.max_steps=-2 is invalid: must be an integer >= 0"),
    (["task.max_length=4"], "task.max_length=4 is invalid: must be an integer >= 8"),
    (["task=squad", "task.max_new_tokens=0"], "task.max_new_tokens=0 is invalid"),
    (["task.num_train=0"], "task.num_train=0 is invalid: must be an integer >= 1"),
    (["task.num_test=-5"], "task.num_test=-5 is invalid"),
    (["method=mezo", "method.eps=0"], "method.eps=0 is invalid: must be a finite number > 0 (the perturbation"),
    (["method=dpzo", "privacy=eps2", "method.clip=0"], "method.clip=0 is invalid: must be a finite number > 0"),
    (["method=dpzo", "privacy=eps2", "method.clip=inf"], "method.clip=inf is invalid"),
    (["method=dpzoso", "privacy=eps2", "method.directions=0"], "method.directions=0 is invalid"),
    (["method=dpsgd", "privacy=eps2", "method.optimizer=lion"], "method.optimizer='lion' is not one of"),
    (["method.peft.mode=adapter"], "method.peft.mode='adapter' is not one of ('none', 'lora', 'prefix')"),
    (["method=dpsgd", "privacy=eps2", "method.trainable=some"], "method.trainable='some' is not one of"),
    (["method=dpzero", "privacy=eps2", "method.clip_target=raw"], "method.clip_target='raw' is not one of"),
    (["method=mezo", "method.z_generator=numpy"], "method.z_generator='numpy' is not one of ('philox', 'torch')"),
    (["model=minilm-l6", "task=sst2-k16", "model.head_init=zeros"], "model.head_init='zeros' is not one of"),
    (["model.dtype=float8"], "model.dtype='float8' is not one of"),
    (["method=mezo", "trainer.precision=16-mixed"], "trainer.precision=16-mixed cannot run mezo: a zeroth-order step"),
    (["method=mezo", "trainer.precision=bf16-true"], "stores the trained weights in bfloat16"),
    (["method=ft", "model.dtype=bfloat16"], "computes without autocast"),
    (["method=ft", "trainer.precision=transformer-engine"], "has no analysis"),
    (["method=dpsgd", "privacy=eps2", "trainer.precision=16-mixed"], "would be clipped at method.clip / scale"),
    (["method=anadp", "privacy=eps2", "trainer.precision=16-mixed"], "scales the loss for a GradScaler"),
    (["method=dpzo", "privacy=eps2", "privacy.target_epsilon=0"], "privacy.target_epsilon=0 is invalid"),
    (["method=dpzo", "privacy=eps2", "privacy.target_epsilon=inf"], "privacy.target_epsilon=inf is invalid"),
    (["method=dpzo", "privacy=eps2", "privacy.target_delta=0"], "privacy.target_delta=0 is invalid: must be in (0, 1)"),
    (["method=dpzo", "privacy=eps2", "privacy.target_delta=1.5"], "privacy.target_delta=1.5 is invalid"),
    (["method=dpzo", "privacy=eps2", "privacy.accountant=prv"], "privacy.accountant='prv' is not one of"),
    (["method=dpzo", "privacy=eps2", "privacy.secure_mode=maybe"], "privacy.secure_mode=maybe is invalid"),
    (["method=dpzo_laplace", "privacy=pure_eps4", "privacy.target_delta=1e-5"], "pure ε-DP (Laplace) has δ = 0"),
    (["method=dpzo", "privacy=none"], "method=dpzo is private: choose a privacy budget"),
    (["method=mezo", "privacy=eps2"], "method=mezo is not private, but privacy=eps2 asks for a guarantee"),
    (["method=dpzo", "privacy=pure_eps4"], "adds gaussian noise but privacy=pure_eps4 is a laplace budget"),
    (["checkpoint.every_n_steps=0"], "checkpoint.every_n_steps=0 is invalid"),
    (["resume=always"], "resume=always is invalid: must be auto or never"),
    (["model.kind=seq2seq"], "model.kind='seq2seq' is not one of"),
    (["task.num_dev=0"], "task.num_dev=0 is invalid"),
    (["method=dpzo", "privacy=eps2", "privacy.mechanism=exponential"], "privacy.mechanism='exponential' is not one of"),
    (["trainer.devices=2"], "trainer.devices=2 needs trainer=ddp"),
    (["trainer.devices=-1"], "trainer.devices=-1 needs trainer=ddp"),  # every GPU: several
    (["trainer.devices='2'"], "trainer.devices=2 needs trainer=ddp"),  # a count spelled as a string
    (["task.protocol=papers"], "task sst2: task.protocol='papers'; valid: dpft, paper"),
    (["method=zero_shot", "select=best_val"], "select=best_val chooses among the validations of a training run"),
    (["method=zero_shot", "trainer.max_steps=5", "select=best_val"],  # steps or not, zero-shot does not train
     "select=best_val chooses among the validations of a training run"),
    (["method=mezo", "trainer.precision=bf16-true", "~model.trainable_dtype"],  # trained in float32 by default
     "trainer.precision=bf16-true stores the trained weights in bfloat16, where a zeroth-order perturb/restore "
     "drifts and small updates round away (dpft-bench --only precision): use bf16-mixed (trainer=gpu) with "
     "model.trainable_dtype=float32, or set model.trainable_dtype=bfloat16 to train in it anyway"),
    (["trainer.max_steps=0", "select=best_val"], "select=best_val chooses among the validations of a training run"),
    (["trainer.precision=fp7"], "trainer.precision=fp7 is not a Lightning precision"),
    (["method=ft", "~trainer.precision", "model.dtype=bfloat16"],  # Lightning's default precision, 32-true
     "trainer.precision=32-true computes without autocast, but model.dtype=bfloat16"),
    (["method=dpzo", "privacy=eps2", "~method._target_"], "method._target_='' is not an importable class"),
    (["method=dpsgd_lora", "privacy=eps2", "method.peft.target_modules=[embed_tokens]"],  # LoRA on an embedding
     "model=opt-tiny with method.trainable=all, method.peft.mode=lora: per-example gradients: layer "
     "'base_model.model.model.decoder.embed_tokens.lora_embedding_A' (ParameterDict) has trainable parameters but"),
    (["method=dpgd_zo", "privacy=eps2", "trainer=ddp", "trainer.devices=2"],
     "trainer.devices=2 cannot run method=dpgd_zo: each process would add its own noise to every parameter"),
    (["method=dpgd_zo", "privacy=eps2", "+method.mask_fraction=0.01"], "method.mask_fraction=0.01 cannot run method=dpgd_zo"),
    (["method=dpgd_zo", "privacy=eps2", "method.clip_target=normalized"],
     "method.clip_target='normalized' is not one of ('gradient_l2',)"),
    (["method=dpzero", "privacy=eps2", "method.clip_target=gradient_l2"],
     "method.clip_target='gradient_l2' is not one of ('difference', 'normalized')"),
    (["method=dpzo", "privacy=eps2", "privacy.target_delta=1"], "privacy.target_delta=1 is invalid: must be in (0, 1)"),
    (["method=dpzo", "privacy=eps2", "privacy.diagnostics=maybe"], "privacy.diagnostics=maybe is invalid"),
    (["method=dpzo", "privacy=eps2", "privacy.allow_large_delta=1"], "privacy.allow_large_delta=1 is invalid"),
    (["method=dpzo", "privacy=pure_eps4"],
     "method=dpzo adds gaussian noise but privacy=pure_eps4 is a laplace budget: use e.g. privacy=eps2"),
    (["method=dpzo_laplace", "privacy=eps2"],
     "method=dpzo_laplace adds laplace noise but privacy=eps2 is a gaussian budget: use e.g. privacy=pure_eps4"),
    (["method=dpzo", "privacy=eps2", "~privacy.mechanism"], "method=dpzo is private: choose a privacy budget"),
    (["method=dpzo", "privacy=eps2", "method._target_=dpft.methods.nowhere.Nothing"],
     "method._target_='dpft.methods.nowhere.Nothing' is not an importable class"),
    # a method config without trainable/peft keys (`~` deletes them): all weights, no PEFT, as in a user's own
    (["model=minilm-l6", "method=dpsgd", "privacy=eps2", "~method.trainable", "~method.peft"],
     "model=minilm-l6 with method.trainable=all, method.peft.mode=none: per-example gradients: layer "
     "'encoder.embeddings.position_embeddings' (Embedding) reads an input of shape (1, 3), not one per forward row"),
    (["method=dpsgd", "privacy=eps2", "method.trainable=all"],
     "model=opt-tiny with method.trainable=all, method.peft.mode=none: per-example gradients: a parameter is shared by"),
    (["trainer=ddp", "model=opt-13b"], "model.device_map=auto spreads one model over the GPUs of one process"),
    # federated methods
    (["method=fedavg", "fed.clients=0"], "fed.clients=0 is invalid"),
    (["method=fedavg", "fed.rounds=0"], "fed.rounds=0 is invalid"),
    (["method=fedavg", "fed.local_batch_size=0"], "fed.local_batch_size=0 is invalid"),
    (["method=fedavg", "method.server_lr=0"], "method.server_lr=0 is invalid"),
    (["method=fedavg", "method.aggregation=median"], "method.aggregation=median is invalid"),
    (["method=fedavg", "model=opt-13b"], "model.device_map=auto is invalid: must be null for federated methods"),
    (["method=dr_encoder", "privacy=eps2", "method.encoder.chunk=0"], "method.encoder.chunk=0 is invalid"),
    (["method=dr_encoder", "privacy=eps2", "method.encoder.hidden=-1"], "method.encoder.hidden=-1 is invalid"),
    (["method=dr_encoder", "privacy=eps2", "method.encoder.steps=0"], "method.encoder.steps=0 is invalid"),
    (["method=dr_encoder", "privacy=eps2", "method.encoder.lr=0"], "method.encoder.lr=0 is invalid"),
    (["method=dr_encoder", "privacy=eps2", "method.encoder.rows=0"], "method.encoder.rows=0 is invalid"),
    (["method=dr_encoder", "privacy=eps2", "method.encoder.var_floor=0"], "method.encoder.var_floor=0 is invalid"),
    # privacy statements without an analysis: DPZero's replace-one convention, DR-Encoder's local noise
    (["method=dpzero", "privacy=eps2", "privacy.convention=paper", "privacy.accountant=rdp"],
     "privacy.convention=paper (replace-one) is accounted by PLD (dp-accounting's RDP has no replace-one Poisson "
     "analysis), not privacy.accountant=rdp: set privacy.accountant=pld"),
    (["method=dpzo_laplace", "privacy=pure_eps4", "privacy.convention=paper"],
     "privacy.convention=paper (replace-one) is analysed for the Gaussian mechanism only, not "
     "privacy.mechanism=laplace: use privacy.convention=ours"),
    (["method=dpzo", "privacy=eps2", "privacy.convention=replace"],
     "privacy.convention='replace' is not one of ('ours', 'paper')"),
    (["method=dr_encoder", "privacy=eps2", "method.noise_placement=local", "privacy.accountant=rdp"],
     "method.noise_placement=local (replace-one, each upload on its own) is accounted by PLD (dp-accounting's RDP "
     "has no replace-one analysis), not privacy.accountant=rdp: set privacy.accountant=pld"),
]


@pytest.mark.parametrize("overrides,message", BEFORE_DATA, ids=[" ".join(o) for o, _ in BEFORE_DATA])
def test_invalid_values_are_refused_with_the_key_and_range(tmp_path, overrides, message):
    cfg = compose_config(["model=opt-tiny", "task=sst2", *overrides], tmp_path, shrink=False)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_a_trainer_without_devices_is_one_device():
    validate_config(compose_config(["model=opt-tiny", "task=sst2", "~trainer.devices"]))
    validate_config(compose_config(["model=opt-tiny", "task=sst2", *FEDAVG, "~trainer.devices"], shrink=False))
    validate_config(compose_config(["model=opt-tiny", "task=sst2", *FEDAVG, "~method.server_lr"], shrink=False))


@pytest.mark.parametrize("overrides", [
    ["method=dpzero", "privacy=eps2", "privacy.convention=paper", "privacy.accountant=pld"],
    ["method=dpzo", "privacy=eps2", "privacy.accountant=rdp", "~privacy.convention"],  # a budget of its own: ours
    ["method=dr_encoder", "privacy=eps2", "method.noise_placement=local", "privacy.accountant=pld"],
    ["method=dr_encoder", "privacy=eps2", "privacy.accountant=rdp", "~method.noise_placement"],  # split
], ids=["paper-pld", "no-convention", "local-pld", "no-placement"])
def test_statements_with_an_analysis_pass(overrides):
    validate_config(compose_config(["model=opt-tiny", "task=sst2", *overrides], shrink=False))


def test_best_val_runs_with_one_training_step():
    validate_config(compose_config(["model=opt-tiny", "task=sst2", "trainer.max_steps=1", "select=best_val"]))


@pytest.mark.parametrize("privacy,units,allowed", [
    ({"target_delta": 1e-3}, 1000, None), ({"target_delta": 1e-3}, 1001, None), ({"target_delta": 1e-3}, 999, False),
    ({"target_delta": 1e-3, "allow_large_delta": True}, 1000, True),
    ({"target_delta": 1e-3, "allow_large_delta": False}, 1000, None),
    ({"target_delta": 0.5, "mechanism": "laplace"}, 10, False),  # pure ε-DP: no δ to compare
])
def test_delta_against_one_over_n(privacy, units, allowed):
    """δ < 1/n passes (False: nothing to record); δ ≥ 1/n is refused, naming the bound, unless allowed (True)."""
    from omegaconf import OmegaConf

    from dpft.validation import check_delta

    p = OmegaConf.create({"mechanism": "gaussian", **privacy})
    if allowed is None:
        with pytest.raises(ConfigError) as err:
            check_delta(p, units, "example")
        assert str(err.value).startswith(f"privacy.target_delta=0.001 is not below 1/n = 1/{units} (examples")
        assert f"Use privacy.target_delta < {1 / units:.3g}, or privacy.allow_large_delta=true" in str(err.value)
    else:
        assert check_delta(p, units, "example") is allowed


def test_valid_defaults_pass(tmp_path):
    for method, privacy in [("ft", "none"), ("mezo", "none"), ("dpzo", "eps2"), ("dpzo_laplace", "pure_eps4"),
                            ("dpsgd", "eps8"), ("anadp", "eps4"), ("dpzopo", "eps2")]:
        cfg = compose_config(["model=opt-tiny", "task=sst2", f"method={method}", f"privacy={privacy}"], tmp_path)
        assert validate_config(cfg) == (privacy != "none")


@requires_data
def test_validation_runs_before_any_data_or_model_is_loaded(tmp_path, monkeypatch):
    def nothing(*args, **kwargs):
        raise AssertionError("loaded before the configuration was validated")

    monkeypatch.setattr(dpft.train, "build_task_from_config", nothing)
    monkeypatch.setattr(dpft.train, "load_model", nothing)
    with pytest.raises(ConfigError, match="method.lr"):
        run(compose_config(["model=opt-tiny", "task=sst2", "method.lr=-1"], tmp_path / "run"))


def _nothing(*args, **kwargs):
    raise AssertionError("loaded before the configuration was checked")


@requires_data
@pytest.mark.parametrize("overrides,message", [
    (["method=dpsgd_lora", "privacy=eps2", "task=sst2-k16"],
     "method.batch_size=64 exceeds the 32 training examples of task sst2-k16: set method.batch_size <= 32"),
    (["task=sst2", "task.num_train=24", "method.batch_size=100"], "exceeds the 24 training examples of task sst2"),
    (["task=cb", "method=mezo", "method.batch_size=151"], "exceeds the 150 training examples of task cb"),
    (["model=opt-125m", "model.pretrained=/nonexistent/opt"], "model.pretrained='/nonexistent/opt' is not a folder"),
    (["model=opt-1.3b", "model.dtype=float32", "task=sst2"],
     "model.pretrained='facebook/opt-1.3b' is not a local folder, nor in the Hugging Face cache, and HF_HUB_OFFLINE=1"),
    (["model=minilm-l6", "task=sst2-k16", "model.pretrained=pkg:no_such_model"], "pip install no-such-model"),
    (["task=boolq", "method=mezo"], "BoolQ/train.jsonl not found. Set DPFT_DATA_DIR to a folder containing"),
    (["task=boolq", "method=zero_shot", "validate=false"], None),  # the test split only: BoolQ/val.jsonl is there
    (["task=sst2-k16", "task.data_seed=87", "method=ft"], None),
])
def test_sources_files_and_batch_size_are_checked_before_anything_loads(tmp_path, monkeypatch, overrides, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("load_model", "load_tokenizer", "TaskDataModule", "FederatedDataModule"):
        monkeypatch.setattr(dpft.train, name, _nothing)
    cfg = compose_config(["model=opt-tiny", "logger=none", *overrides], tmp_path / "run", shrink=False)
    if message is None:
        with pytest.raises(AssertionError, match="loaded before"):  # passed every check, then started loading
            run(cfg)
        return
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert message in str(err.value)


def test_a_hub_model_in_the_cache_passes_offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with the model in the Hugging Face cache (its layout: refs/main names a snapshot)."""
    import huggingface_hub

    repo = tmp_path / "hub" / "models--facebook--opt-1.3b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dpft.validation.check_sources(compose_config(["model=opt-1.3b", "task=sst2"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # with the Hub: the id is left to from_pretrained
    dpft.validation.check_sources(compose_config(["model=opt-6.7b", "task=sst2"]))
    with pytest.raises(ConfigError, match="opt-6.7b"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        dpft.validation.check_sources(compose_config(["model=opt-6.7b", "task=sst2"]))


def test_a_missing_split_file_is_one_line_without_traceback_or_results(tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "dpft.train", "model=opt-tiny", "task=boolq", "method=mezo",
                          "logger=none", f"hydra.run.dir={folder}"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "BoolQ/train.jsonl not found" in out.stderr.strip().splitlines()[-1]
    assert not (folder / "results.json").exists()


# checks that need the data or the model: still before the first step
@requires_data
@pytest.mark.parametrize("overrides,error,message", [
    (["task=sst2-k16", "task.data_seed=7"], ValueError, "data_seed 7 has no LM-BFF split; valid data seeds"),
    (["task=sst2", "method=dpzo", "privacy=eps2", "privacy.target_epsilon=1e-9", "privacy.target_delta=1e-15"],
     ValueError, "unreachable"),
    (["model=roberta-tiny", "task=squad"], ValueError, "needs a causal LM"),
    (["model=roberta-tiny", "task=wic"], ValueError, "no masked-LM"),
    (["model=minilm-l6", "task=sst2-k16", "method=mezo_prefix"], ValueError, "prefix is not supported for"),
    (["task=sst2", "ckpt_path=/nonexistent/last.ckpt"], ValueError, "ckpt_path=/nonexistent/last.ckpt does not"),
])
def test_values_checked_against_data_and_model_fail_before_training(make_cfg, overrides, error, message):
    cfg = make_cfg("model=opt-tiny", *overrides)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(cfg)


@pytest.mark.parametrize("group,value", [("method", "dpsdg"), ("model", "opt-7b"), ("task", "sst-2"),
                                         ("privacy", "eps3")])
def test_unknown_options_list_the_valid_ones(tmp_path, group, value):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose_config([f"{group}={value}"], tmp_path)
    assert f"Could not find '{group}/{value}'" in str(err.value) and f"Available options in '{group}'" in str(err.value)


@pytest.mark.parametrize("method", ["dpsgd", "dpsgd_lora", "anadp", "dpzopo"])
def test_methods_that_combine_tensors_on_one_device_are_refused_on_a_multi_gpu_device_map(monkeypatch, method):
    big = ["privacy=eps2", "model=opt-13b", "model.pretrained=null", "trainer.precision=bf16-mixed"]
    cfg = compose_config([f"method={method}", *big])
    monkeypatch.setattr(dpft.validation, "visible_gpus", lambda: 1)
    validate_config(cfg)  # one GPU: the whole map is on it
    monkeypatch.setattr(dpft.validation, "visible_gpus", lambda: 2)
    with pytest.raises(ConfigError, match=f"model.device_map=auto spreads the model over 2 GPUs, which method={method}"):
        validate_config(cfg)
    validate_config(compose_config(["method=dpzo", *big]))  # the ZO step works tensor by tensor, where each lies


def test_a_refused_config_ends_in_one_line_without_traceback_or_results(tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "dpft.train", "method=mezo", "trainer.precision=16-mixed",
                          "logger=none", f"hydra.run.dir={folder}"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("dpft-train: trainer.precision=16-mixed cannot run mezo")
    assert not (folder / "results.json").exists()  # a report would list it as a failed run


def test_dpft_sweep_names_the_tables_for_an_unknown_one_and_prints_runnable_commands(capsys):
    import shlex

    from dpft.report.run_table import main as sweep_main

    with pytest.raises(SystemExit, match="dpft-sweep: unknown table 'cpuu': .* cpu, demo, dpzero_opt"):
        sweep_main(["cpuu", "--dry-run"])
    sweep_main(["cpu", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines and all(shlex.split(line)[:2] == ["dpft-train", "--multirun"] for line in lines)


def test_a_data_mirror_that_is_not_a_folder_is_refused_before_anything_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("DPFT_DATA_DIR", str(tmp_path / "no-such-mirror"))
    with pytest.raises(ConfigError, match=r"DPFT_DATA_DIR=.*no-such-mirror is not a folder"):
        validate_config(compose_config(["method=mezo"]))


# Each range at its edges: the smallest (or largest) accepted value passes and the first value past it, a value of
# the wrong type, NaN and ∞ where a number is asked are refused, naming the key. A slip in a bound (> for >=, 2
# for 1), in a type test (`or` for `and`) or in the key a message names fails here.
FEDAVG = ["method=fedavg", "fed.clients=5", "fed.clients_per_round=2"]
DR = ["method=dr_encoder", "privacy=eps2", "fed.clients=5", "fed.clients_per_round=2", "method.encoder.chunk=8",
      "method.encoder.compression=2"]
EDGES = [
    # (key as the message names it, override key, context, accepted values, refused values)
    ("fed.clients", "fed.clients", ["method=fedavg", "fed.clients_per_round=1"], [1, 2], [0, -1, 1.5, "'3'"]),
    ("method.batch_size (clients per round, fed.clients_per_round)", "fed.clients_per_round", FEDAVG[:2],
     [1, 5], [6, 9]),  # 0, 2.5 and True: refused as method.batch_size by the checks of every method
    ("fed.rounds", "fed.rounds", FEDAVG, [1], [0]),  # 1.5: refused as trainer.max_steps (= fed.rounds) first
    ("fed.local_steps", "fed.local_steps", FEDAVG, [1], [0, 1.5]),
    ("fed.local_batch_size", "fed.local_batch_size", FEDAVG, [1], [0, 1.5]),
    ("fed.partition", "fed.partition", FEDAVG, ["iid", "dirichlet"], ["shards"]),
    ("fed.alpha", "fed.alpha", FEDAVG, [1e-9, 1e9, 1], [0, -1e-9, "inf", "nan", "'a'", False]),
    ("method.server_lr", "method.server_lr", FEDAVG, [1e-9, 2], [0, "inf", "nan", "'a'"]),
    ("method.aggregation", "method.aggregation", FEDAVG, ["mean"], ["median"]),
    ("trainer.devices", "trainer.devices", FEDAVG, [1, "'1'"], [2, "'2'"]),
    ("trainer.devices", "trainer.devices", [*FEDAVG, "trainer=ddp"], [1], [2]),  # data parallel or not: one process
    ("method.prior_rounds", "method.prior_rounds", DR, [1, 3], [0, 1.5]),
    ("method.encoder.chunk", "method.encoder.chunk", DR, [2], [0, 1.5]),
    ("method.encoder.chunk", "method.encoder.chunk", [*DR, "method.encoder.compression=1"], [1], [0]),
    ("fed.clients", "fed.clients", DR, [2], [0]),  # the federation's own checks still run beside the encoder's
    ("method.encoder.compression", "method.encoder.compression", DR, [1, 8], [0, 9, 2.5]),
    ("method.encoder.hidden", "method.encoder.hidden", DR, [0, 1], [-1, 1.5]),
    ("method.encoder.steps", "method.encoder.steps", DR, [1], [0, 1.5]),
    ("method.encoder.lr", "method.encoder.lr", DR, [1e-9, 1], [0, "inf", "nan", "'a'"]),
    ("method.encoder.rows", "method.encoder.rows", DR, [1], [0, 1.5]),
    ("method.encoder.var_floor", "method.encoder.var_floor", DR, [1e-9, 1], [0, "inf", "nan", "'a'"]),
    ("method.noise_placement", "method.noise_placement", [*DR, "privacy.accountant=pld"], ["split", "local"],
     ["central", "Local"]),
]


@pytest.mark.parametrize("key,override,context,accepted,refused", EDGES, ids=[e[0].split()[0] for e in EDGES])
def test_federated_ranges_at_their_edges(key, override, context, accepted, refused):
    for value in accepted:
        validate_config(compose_config(["model=opt-tiny", "task=sst2", *context, f"{override}={value}"], shrink=False))
    for value in refused:
        with pytest.raises(ConfigError) as err:
            validate_config(compose_config(["model=opt-tiny", "task=sst2", *context, f"{override}={value}"],
                                           shrink=False))
        assert str(err.value).startswith(f"{key}="), (value, str(err.value))
