"""Scorers compute the output layer only at the positions a loss reads: same logits, same losses."""

from __future__ import annotations

import pytest
import torch

from dpft.data.tasks import build_task
from dpft.models import scoring
from dpft.models.loading import load_model, load_tokenizer
from dpft.models.peft import apply_peft
from dpft.models.scoring import build_scorer, logits_at
from tests.conftest import compose_config, requires_data

pytestmark = requires_data


def _setup(model_name: str, task_name: str, peft: str = "none"):
    cfg = compose_config([f"model={model_name}", f"task={task_name}", "method=mezo", f"method.peft.mode={peft}"])
    task = build_task(task_name, num_train=24, num_dev=8, num_test=8) if "-k" not in task_name else build_task(task_name)
    scorer = build_scorer(cfg.model.kind, task, load_tokenizer(cfg.model), max_length=48)
    model = apply_peft(load_model(cfg.model, num_labels=task.num_labels), cfg.method.peft).eval()
    examples = task.splits(("train",))["train"][:6]
    return model, scorer, examples, scorer.collate(examples, train=True)


def _full_then_gather(model, batch, positions):
    """The reference: the output layer at every position, then the rows asked for."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[torch.arange(logits.shape[0])[:, None], positions]


@pytest.mark.parametrize("model_name,task_name,peft", [
    ("opt-tiny", "sst2", "none"), ("opt-tiny", "sst2", "lora"), ("opt-tiny", "sst2", "prefix"),
    ("roberta-tiny", "sst2-k16", "none"), ("roberta-tiny", "sst2-k16", "lora")])
def test_logits_at_equal_the_full_logits_there(model_name, task_name, peft):
    model, _, _, batch = _setup(model_name, task_name, peft)
    b, length = batch["input_ids"].shape
    positions = torch.randint(0, length, (b, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        selected = logits_at(model, batch, positions)
        full = _full_then_gather(model, batch, positions)
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert selected.shape == (b, 3, model.config.vocab_size)
    torch.testing.assert_close(selected, full, rtol=1e-5, atol=1e-5)
    assert after.shape[:2] == (b, length)  # the selection hook is gone afterwards


@pytest.mark.parametrize("task_name", ["copa", "squad"])
def test_predicted_positions_are_those_of_the_gold_continuation(task_name):
    _, scorer, examples, batch = _setup("opt-tiny", task_name)
    lengths = batch["attention_mask"].sum(1)
    for row, ex in enumerate(examples):
        conts = scorer.task.causal_continuations(ex)
        gold = scorer._encode(conts[0] if task_name == "squad" else conts[ex.label])
        at = batch["predict_at"][row][batch["predict_mask"][row]]
        assert at.tolist() == list(range(int(lengths[row]) - len(gold) - 1, int(lengths[row]) - 1))
        assert batch["input_ids"][row, at + 1].tolist() == gold


@pytest.mark.parametrize("model_name,task_name", [("opt-tiny", "sst2"), ("opt-tiny", "copa"),
                                                  ("opt-tiny", "squad"), ("roberta-tiny", "sst2-k16")])
def test_losses_equal_those_from_the_full_logits(model_name, task_name, monkeypatch):
    model, scorer, _, batch = _setup(model_name, task_name)
    with torch.no_grad():
        losses = scorer.losses(model, batch)
        monkeypatch.setattr(scoring, "logits_at", _full_then_gather)
        reference = scorer.losses(model, batch)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-6)
