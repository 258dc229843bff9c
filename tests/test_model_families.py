"""Every method on today's open model families (tiny random Llama, Qwen2, GPT-NeoX, Gemma, Phi): a few real steps each,
the ε spent within the target; LoRA presets, the papers' token ids refused, generation with EOS as pad."""

from __future__ import annotations

import re

import pytest
import torch

from dpft.train import run
from tests.conftest import requires_data
from tests.test_dp_first_order import FAMILIES

pytestmark = requires_data

METHODS = ("mezo", "dpzo", "dpzero", "dpzopo", "dpsgd", "dpsgd_lora", "anadp", "dp_fedavg", "dr_encoder", "mezo_lora",
           "mezo_prefix")  # prefix tuning: past keys and values in each family's (grouped-query) head layout
FEDERATED = ["fed.clients=6", "fed.local_steps=1", "fed.local_batch_size=2", "method.batch_size=2"]
EXTRA = {"dpzopo": ["method.mask_queries=1"], "dp_fedavg": FEDERATED,
         "dr_encoder": [*FEDERATED, "method.encoder.steps=2", "method.encoder.rows=4"]}
# the default suite runs each method on one family (method i on family i mod 5, so each family runs two or three
# methods); the rest of the cross product is marked slow (make test-full)
DEFAULT = {(method, FAMILIES[i % len(FAMILIES)]) for i, method in enumerate(METHODS)}
CASES = [pytest.param(method, family, id=f"{family}-{method}",
                      marks=() if (method, family) in DEFAULT else pytest.mark.slow)
         for family in FAMILIES for method in METHODS]


@pytest.mark.parametrize("method,family", CASES)
def test_every_method_runs_on_every_family_within_its_budget(make_cfg, method, family):
    privacy = "privacy=none" if method.startswith("mezo") else "privacy=eps4"
    results = run(make_cfg(f"model={family}", "task=sst2", f"method={method}", privacy, *EXTRA.get(method, [])))
    assert results["status"] == "completed" and 0.0 <= results["metrics"]["test/acc"] <= 100.0
    p = results["privacy"]
    if not method.startswith("mezo"):
        assert p["steps"] == p["budget_steps"] >= 3 and 0 < p["epsilon_spent"] <= 4.0


# each architecture's attention projections and MLP matrices (written out from the model code)
ATTENTION = {"opt-tiny": r"self_attn\.(q|k|v|out)_proj", "llama-tiny": r"self_attn\.[qkvo]_proj",
             "qwen2-tiny": r"self_attn\.[qkvo]_proj", "gemma-tiny": r"self_attn\.[qkvo]_proj",
             "gpt-neox-tiny": r"attention\.(query_key_value|dense)", "phi-tiny": r"self_attn\.([qkv]_proj|dense)",
             "roberta-tiny": r"attention\.self\.(query|key|value)|attention\.output\.dense"}
MLP = {"opt-tiny": r"\.fc[12]", "llama-tiny": r"mlp\.(gate|up|down)_proj", "qwen2-tiny": r"mlp\.(gate|up|down)_proj",
       "gemma-tiny": r"mlp\.(gate|up|down)_proj", "gpt-neox-tiny": r"mlp\.dense_(h_to_4h|4h_to_h)",
       "phi-tiny": r"mlp\.fc[12]",
       "roberta-tiny": r"intermediate\.dense|layer\.\d+\.output\.dense"}


@pytest.mark.parametrize("name", sorted(ATTENTION))
@pytest.mark.parametrize("preset", ["attention", "attention_mlp"])
def test_lora_presets_adapt_each_architectures_own_projections(name, preset):
    from dpft.models.loading import load_model
    from dpft.models.peft import apply_peft
    from tests.conftest import compose_config

    cfg = compose_config([f"model={name}", "method=dpsgd_lora", f"method.peft.target_modules={preset}"])
    pattern = ATTENTION[name] + (f"|{MLP[name]}" if preset == "attention_mlp" else "")
    expected = {n for n, m in load_model(cfg.model).named_modules()
                if isinstance(m, torch.nn.Linear) and re.search(f"({pattern})$", n)}
    model = apply_peft(load_model(cfg.model), cfg.method.peft)
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
               for n, _ in model.named_modules() if n.endswith("lora_A.default")}
    assert adapted == expected and len(expected) >= 4


def test_an_unknown_lora_preset_is_refused_before_data(make_cfg):
    from dpft.validation import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"method.peft.target_modules='mlp_only' is not one of \('attention', 'attention_mlp'\)"):
        validate_config(make_cfg("model=llama-tiny", "task=sst2", "method=dpsgd_lora", "privacy=eps4",
                                 "method.peft.target_modules=mlp_only"))


@pytest.mark.parametrize("model,kind", [("llama-tiny", "causal_lm"), ("gemma-tiny", "causal_lm")])
def test_the_papers_token_ids_are_refused_for_other_families(make_cfg, model, kind):
    """task.protocol=paper reproduces MeZO's OPT token ids (its `<s>` BOS, its template spacing): on a Llama or Gemma
    tokenizer those ids mean something else, so the run is refused before data, naming the fix."""
    from dpft.validation import ConfigError, validate_config

    with pytest.raises(ConfigError, match=rf"written for opt {kind} models, not model={model} .* task.protocol=dpft"):
        validate_config(make_cfg(f"model={model}", "task=sst2", "method=mezo", "task.protocol=paper"))
    validate_config(make_cfg("model=opt-tiny", "task=sst2", "method=mezo", "task.protocol=paper"))


@pytest.mark.parametrize("family", [FAMILIES[0], *(pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES[1:])])
def test_generation_of_a_padded_batch_equals_each_prompt_alone(family):
    """No pad token (EOS pads), prompts of different lengths padded on the left: greedy answers to SQuAD prompts in
    one batch are those of each prompt decoded alone."""
    from dpft.data.tasks import build_task
    from dpft.models.loading import load_model, load_tokenizer
    from dpft.models.scoring import build_scorer
    from tests.conftest import compose_config

    cfg = compose_config([f"model={family}", "task=squad"])
    tokenizer = load_tokenizer(cfg.model)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the GPT-2 tokenizer has none of its own
    task = build_task("squad", num_train=8, num_dev=4, num_test=8)
    scorer = build_scorer(cfg.model.kind, task, tokenizer, max_length=96)
    scorer.max_new_tokens = 6
    model = load_model(cfg.model).eval()
    examples = task.splits(("test",))["test"][:4]
    batch = scorer.collate(examples, train=False)
    assert batch["attention_mask"].sum(1).unique().numel() > 1 and (batch["attention_mask"][:, 0] == 0).any()
    _, together = scorer.predict(model, batch)
    alone = [scorer.predict(model, scorer.collate([ex], train=False))[1][0] for ex in examples]
    assert together == alone and any(together)
