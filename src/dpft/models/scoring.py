"""Turn examples into tensors and model outputs into per-example losses and predictions.

One scorer per model kind:
- `CausalLMScorer` (OPT, MeZO protocol): classification as cross-entropy over the candidates'
  mean token log-likelihoods; multiple choice and generation trained LM-style on the gold
  continuation (teacher forcing, loss on its tokens only); generation evaluated by greedy decoding.
- `MaskedLMScorer` (RoBERTa, LM-BFF): cross-entropy over the label words' logits at `<mask>`.
- `ClassifierScorer` (MiniLM): cross-entropy over a classification head.

Every loss is per example (`reduction="none"`): private methods clip per example. A batch with several
forward rows per example (one per candidate) maps each row to its example in `batch["owner"]`, which
per-example gradients read to clip the example, not the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from dpft.data.tasks import Example, Task


def _pad(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def logits_at(model: nn.Module, batch: dict[str, Any], positions: torch.Tensor,
              head: nn.Module | None = None) -> torch.Tensor:
    """LM logits [B, K, V] at positions [B, K] only, in float32. Over every position the output layer and its
    [B, L, V] logits took about half of an OPT-125m forward at 16 × 128 (CPU), yet every loss here reads a few
    positions. A pre-hook on the output layer (`head`, default the model's output embedding) selects them, so
    wrappers (peft's LoRA, prefix tuning) keep their own forward.

    A linear head is then recomputed on those rows in float32, outside autocast: bf16 logits are rounded to 2⁻⁸ of
    their size (0.0625 at |logit| ∈ [8, 16)), more than DP-ZO's clip on ℓ⁺ − ℓ⁻ (C = 0.05)."""
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
    head = model.get_output_embeddings() if head is None else head
    handles = [head.register_forward_pre_hook(lambda _, args: (args[0][rows, positions], *args[1:]))]
    device = batch["input_ids"].device.type
    rounded = head.weight.dtype != torch.float32 or torch.is_autocast_enabled(device)  # else it is float32 already
    if type(head) is nn.Linear and rounded:  # a peft-wrapped head keeps its own (adapter) forward, upcast after it
        handles.append(head.register_forward_hook(lambda module, args, out: exact_values(out, module, args[0])))
    try:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    finally:
        for handle in handles:
            handle.remove()


def exact_values(out: torch.Tensor, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`out` = layer(x) with the values of `float32_linear`; the gradient still flows through `out` itself, where
    per-example gradient hooks read it."""
    with torch.no_grad():
        correction = float32_linear(layer, x) - out.float()
    return out.float() + correction


def float32_linear(layer: nn.Linear, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """`layer(x)` in float32 whatever the weights' dtype and autocast, upcasting `chunk` output rows of the weight
    at a time (a whole fp32 copy of OPT-13B's output embedding would be 1 GB)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        out = torch.cat([x @ layer.weight[i:i + chunk].float().T for i in range(0, layer.out_features, chunk)], -1)
        return out + layer.bias.float() if layer.bias is not None else out


@dataclass
class Scorer:
    task: Task
    tokenizer: PreTrainedTokenizerBase
    max_length: int = 256

    def collate(self, examples: list[Example], train: bool) -> dict[str, Any]:
        raise NotImplementedError

    def losses(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Per-example training losses, shape [B]."""
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor | None, list[Any]]:
        """(per-example eval losses or None, predictions: label index or generated text)."""
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class CausalLMScorer(Scorer):
    max_new_tokens: int = 50

    def _row(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        """BOS + prompt + continuation, the prompt cut from the left to fit; returns (ids, n_cont)."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        cont = self._encode(continuation)
        room = self.max_length - len(bos) - len(cont)
        prompt_ids = self._encode(prompt)[-room:] if room > 0 else []
        return bos + prompt_ids + cont, len(cont)

    def _single_token_words(self, example: Example | None = None) -> list[int] | None:
        """Label-word ids when every classification candidate is one token: then one forward row per
        example scores all candidates (classification continuations do not depend on the example)."""
        if self.task.kind != "classification":
            return None
        if not hasattr(self, "_word_ids"):
            ids = [self._encode(c) for c in self.task.causal_continuations(example)]
            self._word_ids = [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None
        return self._word_ids

    def collate(self, examples: list[Example], train: bool) -> dict[str, Any]:
        task = self.task
        batch: dict[str, Any] = {"examples": examples}
        if task.kind == "generation" and not train:
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            rows = [bos + self._encode(task.causal_prompt(ex))[-(self.max_length - self.max_new_tokens - 1):]
                    for ex in examples]
            batch["input_ids"], batch["attention_mask"] = _pad(rows, self.tokenizer.pad_token_id, left=True)
            return batch
        if self._single_token_words(examples[0]) is not None:
            rows = [self._row(task.causal_prompt(ex), "")[0] for ex in examples]
            batch["input_ids"], batch["attention_mask"] = _pad(rows, self.tokenizer.pad_token_id)
            batch["last"] = batch["attention_mask"].sum(1) - 1
            batch["labels"] = torch.tensor([ex.label for ex in examples])
            return batch
        # one row per (example, candidate); LM-style training only needs the gold row
        rows, n_cont, owner = [], [], []
        for i, ex in enumerate(examples):
            conts = task.causal_continuations(ex)
            if train and task.kind != "classification":
                conts = conts[:1] if task.kind == "generation" else [conts[ex.label]]
            for c in conts:
                ids, n = self._row(task.causal_prompt(ex), c)
                rows.append(ids)
                n_cont.append(n)
                owner.append(i)
        batch["input_ids"], batch["attention_mask"] = _pad(rows, self.tokenizer.pad_token_id)
        # the positions whose next token is a continuation token (padded with the last one, masked)
        spans = [range(max(len(r) - n - 1, 0), len(r) - 1) for r, n in zip(rows, n_cont)]
        width = max(max(len(s) for s in spans), 1)
        batch["predict_at"] = torch.tensor([[*s, *[s[-1] if s else 0] * (width - len(s))] for s in spans])
        batch["predict_mask"] = torch.arange(width) < torch.tensor([len(s) for s in spans])[:, None]
        batch["owner"] = torch.tensor(owner)
        batch["labels"] = torch.tensor([ex.label if ex.label is not None else -1 for ex in examples])
        return batch

    def _mean_logprob(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Mean log-likelihood of each row's continuation tokens."""
        at = batch["predict_at"]
        logp = torch.log_softmax(logits_at(model, batch, at).float(), dim=-1)
        token_logp = logp.gather(-1, batch["input_ids"].gather(1, at + 1).unsqueeze(-1)).squeeze(-1)
        mask = batch["predict_mask"].to(token_logp.dtype)
        return (token_logp * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def _candidate_scores(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """[B, C] mean log-likelihood per candidate (padded with -inf for ragged candidate lists)."""
        words = self._single_token_words()
        if words is not None:
            last = logits_at(model, batch, batch["last"][:, None])[:, 0].float()
            return torch.log_softmax(last, dim=-1)[:, words]
        row_scores = self._mean_logprob(model, batch)
        owner = batch["owner"]
        n_ex = len(batch["examples"])
        counts = torch.bincount(owner, minlength=n_ex)
        scores = row_scores.new_full((n_ex, int(counts.max())), float("-inf"))
        slot = torch.arange(len(owner), device=owner.device) - torch.cumsum(counts, 0)[owner] + counts[owner]
        scores[owner, slot] = row_scores
        return scores

    def losses(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if self.task.kind == "classification":
            return F.cross_entropy(self._candidate_scores(model, batch), batch["labels"], reduction="none")
        return -self._mean_logprob(model, batch)  # gold continuation only (see collate)

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor | None, list[Any]]:
        if self.task.kind == "generation":
            return None, self._generate(model, batch)
        scores = self._candidate_scores(model, batch)
        losses = None
        if (batch["labels"] >= 0).all():
            losses = F.cross_entropy(scores.masked_fill(scores.isinf(), -1e9), batch["labels"], reduction="none")
        return losses, scores.argmax(-1).tolist()

    def _generate(self, model: nn.Module, batch: dict[str, Any]) -> list[str]:
        newline = self._encode("\n")
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
            max_new_tokens=self.max_new_tokens, eos_token_id=[self.tokenizer.eos_token_id, *newline[-1:]],
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.split("\n")[0].strip() for t in texts]


class MaskedLMScorer(Scorer):
    def _word_ids(self) -> list[int]:
        if not hasattr(self, "_words"):
            # LM-BFF: the first sub-token of " " + word
            self._words = [self._encode(" " + w)[0] for w in self.task.label_words]
        return self._words

    def collate(self, examples: list[Example], train: bool) -> dict[str, Any]:
        tok = self.tokenizer
        rows, where = [], []
        for ex in examples:
            left, right = self.task.masked_prompt(ex)
            left_ids, right_ids = self._encode(left), self._encode(right)
            room = self.max_length - 3 - len(right_ids)
            if room < len(left_ids):  # cut the (long) first sentence from its end, keep the template
                left_ids = left_ids[: max(room, 0)]
            row = [tok.cls_token_id, *left_ids, tok.mask_token_id, *right_ids][: self.max_length - 1]
            row.append(tok.sep_token_id)
            rows.append(row)
            where.append(1 + len(left_ids))
        input_ids, attention_mask = _pad(rows, tok.pad_token_id)
        return {"examples": examples, "input_ids": input_ids, "attention_mask": attention_mask,
                "mask_pos": torch.tensor(where), "labels": torch.tensor([ex.label for ex in examples])}

    def _scores(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return logits_at(model, batch, batch["mask_pos"][:, None])[:, 0, self._word_ids()].float()

    def losses(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(self._scores(model, batch), batch["labels"], reduction="none")

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor | None, list[Any]]:
        scores = self._scores(model, batch)
        return F.cross_entropy(scores, batch["labels"], reduction="none"), scores.argmax(-1).tolist()


class ClassifierScorer(Scorer):
    def collate(self, examples: list[Example], train: bool) -> dict[str, Any]:
        pairs = [self.task.text_pair(ex) for ex in examples]
        first = [a for a, _ in pairs]
        second = [b for _, b in pairs] if pairs and pairs[0][1] is not None else None
        enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        return {"examples": examples, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([ex.label for ex in examples])}

    def losses(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor | None, list[Any]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        return F.cross_entropy(logits, batch["labels"], reduction="none"), logits.argmax(-1).tolist()


SCORERS = {"causal_lm": CausalLMScorer, "masked_lm": MaskedLMScorer, "classifier": ClassifierScorer}


def check_compatible(kind: str, task: Task, model_name: str) -> None:
    """Fail early, with the fix, when a model kind cannot run a task."""
    if kind != "causal_lm" and task.kind != "classification":
        raise ValueError(
            f"task {task.name} is a {task.kind} task, which needs a causal LM (prompted scoring/generation); "
            f"model {model_name} is a {kind}. Use model=opt-* (e.g. model=opt-tiny)."
        )
    if kind == "masked_lm" and type(task).masked_prompt is Task.masked_prompt:
        raise ValueError(f"task {task.name} has no masked-LM (LM-BFF) template; use a causal LM (model=opt-*) "
                         f"or an LM-BFF task (e.g. task={task.name}-k512)")


def build_scorer(kind: str, task: Task, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 max_new_tokens: int = 50) -> Scorer:
    scorer = SCORERS[kind](task=task, tokenizer=tokenizer, max_length=max_length)
    if isinstance(scorer, CausalLMScorer):
        scorer.max_new_tokens = max_new_tokens
    return scorer
