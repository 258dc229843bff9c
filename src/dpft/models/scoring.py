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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from dpft.data.task_base import Rendered, split_prompt
from dpft.data.tasks import Example, Task

log = logging.getLogger(__name__)


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


def holds_template(rendered: Rendered, end: int) -> bool:
    """Whether rendered.text[:end] holds template characters (any outside the example's fields)."""
    position = 0
    for s, e in sorted(rendered.fields):
        if s > position and position < end:
            return True
        position = max(position, e)
    return position < end


def fit(pieces: list[Rendered], budget: int, count: Callable[[list[Rendered]], int],
        offsets: Callable[[str], list[tuple[int, int]]], what: str) -> list[Rendered]:
    """The pieces with the example's text shortened, never the template, until `count(pieces) <= budget`: each
    round the longest field (in tokens, the first of equals) loses as many tokens at its end as are too many."""
    pieces = list(pieces)
    while (excess := count(pieces) - budget) > 0:
        sizes = [(len(offsets(p.text[s:e])), i, j) for i, p in enumerate(pieces) for j, (s, e) in enumerate(p.fields)]
        n, i, j = max(sizes, key=lambda t: (t[0], -t[1], -t[2]), default=(0, 0, 0))
        if n == 0:
            raise ValueError(f"{what}: the template alone needs {count(pieces)} tokens, more than the {budget} left "
                             "by task.max_length; raise task.max_length")
        s, e = pieces[i].fields[j]
        keep = max(n - excess, 0)
        end = s + offsets(pieces[i].text[s:e])[keep - 1][1] if keep else s
        pieces[i] = pieces[i].cut(j, min(end, e - 1))
    return pieces


@dataclass
class Scorer:
    task: Task
    tokenizer: PreTrainedTokenizerBase
    max_length: int = 256

    @property
    def paper(self) -> bool:
        """Whether the run feeds the model the reference code's token ids (`task.protocol=paper`)."""
        return self.task.protocol == "paper"

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

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


class CausalLMScorer(Scorer):
    max_new_tokens: int = 50

    def _bos(self) -> list[int]:
        if self.paper:  # MeZO's run.py sets tokenizer.bos_token_id = 0 for OPT: <s>, where OPT was trained with </s>
            return [self.tokenizer.convert_tokens_to_ids("<s>")]
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def rows(self, example: Example, train: bool) -> list[tuple[list[int], int]]:
        """The token rows the model reads for one example, each with how many of its last tokens are scored: one per
        candidate (classification; multiple choice in evaluation), the gold candidate's alone (multiple choice in
        training), the prompt to decode from (generation in evaluation, 0 scored) or the gold answer's row
        (generation in training). A row longer than task.max_length loses the example's text, never the template:
        `_dpft_rows` and `_paper_row`."""
        task = self.task
        encoded, sep, options = task.causal_parts(example)
        generation = task.kind == "generation"
        if generation and not train:
            options = [None]
        elif train and task.kind == "multiple_choice":
            options = [options[example.label]]
        # MeZO's encode_prompt keeps max_new_tokens free for generation tasks, in training too (run.py passes them)
        limit = self.max_length - (self.max_new_tokens if generation and (self.paper or not train) else 0)
        if self.paper:
            prompt_length = len(self._encode(encoded.strip(" ").text))
            return [self._paper_row(encoded, sep, option, limit, prompt_length) for option in options]
        return self._dpft_rows(encoded, sep, options, limit)

    def _dpft_rows(self, encoded: Rendered, sep: str, options: list[str | None],
                   limit: int) -> list[tuple[list[int], int]]:
        """BOS + prompt + continuation, the prompt and each continuation tokenised apart (`split_prompt`: the
        continuation's first token carries its leading space); a long prompt's longest field is shortened."""
        bos, prompt = self._bos(), encoded.rstrip(" ")
        prompt_ids = self._encode(prompt.text)
        out = []
        for option in options:
            cont = [] if option is None else self._encode(split_prompt(encoded.text, sep, [option])[1][0])
            budget = limit - len(bos) - len(cont)
            ids = prompt_ids
            if len(ids) > budget:
                [short] = fit([prompt], budget, lambda ps: len(self._encode(ps[0].text)), self._offsets,
                              f"task {self.task.name}")
                ids = self._encode(short.text)
            out.append((bos + ids + cont, len(cont)))
        return out

    def _paper_row(self, encoded: Rendered, sep: str, option: str | None, limit: int,
                   prompt_length: int) -> tuple[list[int], int]:
        """MeZO's utils.encode_prompt: the whole `encode + sep + option` tokenised at once, stripped of spaces at
        both ends and of whitespace at its start; the last `len(verbalized) - len(encoded)` tokens are scored; a long
        row loses tokens at its start, as MeZO's (`bos + ids[1:][-(max_length - 1):]`), when those are the example's
        text, and else the longest field is shortened."""
        verbalized = (encoded if option is None else encoded + sep + option).strip(" ")
        scored = 0 if option is None else len(self._encode(verbalized.text)) - prompt_length
        final = verbalized.lstrip()
        ids = self._encode(final.text)
        room = limit - 1
        if len(ids) > room:
            cut = len(ids) - room
            if not holds_template(final, self._offsets(final.text)[cut - 1][1]):
                ids = ids[cut:]
            else:
                [final] = fit([final], room, lambda ps: len(self._encode(ps[0].text)), self._offsets,
                              f"task {self.task.name}")
                ids = self._encode(final.text)
        return self._bos() + ids, scored

    def collate(self, examples: list[Example], train: bool) -> dict[str, Any]:
        task = self.task
        batch: dict[str, Any] = {"examples": examples}
        rows = [self.rows(ex, train) for ex in examples]
        if task.kind == "generation" and not train:
            batch["input_ids"], batch["attention_mask"] = _pad([r[0][0] for r in rows], self.tokenizer.pad_token_id,
                                                               left=True)
            return batch
        words = [tuple(ids[-1] for ids, _ in r) for r in rows]
        if task.kind == "classification" and len(set(words)) == 1 and all(
                n == 1 and ids[:-1] == r[0][0][:-1] for r in rows for ids, n in r):
            # every candidate one token after the same prompt: one row per example scores them all
            batch["input_ids"], batch["attention_mask"] = _pad([r[0][0][:-1] for r in rows], self.tokenizer.pad_token_id)
            batch["last"] = batch["attention_mask"].sum(1) - 1
            batch["words"] = torch.tensor(words[0])
            batch["labels"] = torch.tensor([ex.label for ex in examples])
            return batch
        # one row per (example, candidate); LM-style training only needs the gold row (see rows)
        flat, n_cont, owner = [], [], []
        for i, r in enumerate(rows):
            for ids, n in r:
                flat.append(ids)
                n_cont.append(n)
                owner.append(i)
        batch["input_ids"], batch["attention_mask"] = _pad(flat, self.tokenizer.pad_token_id)
        # the positions whose next token is a continuation token (padded with the last one, masked)
        spans = [range(max(len(r) - n - 1, 0), len(r) - 1) for r, n in zip(flat, n_cont)]
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
        if "words" in batch:
            last = logits_at(model, batch, batch["last"][:, None])[:, 0].float()
            return torch.log_softmax(last, dim=-1)[:, batch["words"]]
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

    def row(self, example: Example) -> tuple[list[int], int]:
        """<s> left <mask> right </s> and the mask's position; a row longer than task.max_length loses the example's
        text, never the template or the mask (its longest sentence is shortened at its end). `_paper_row` under
        the paper protocol."""
        if self.paper:
            return self._paper_row(example)
        tok = self.tokenizer
        left, right = fit(list(self.task.masked_parts(example)), self.max_length - 3,
                          lambda ps: sum(len(self._encode(p.text)) for p in ps), self._offsets,
                          f"task {self.task.name}")
        left_ids, right_ids = self._encode(left.text), self._encode(right.text)
        return [tok.cls_token_id, *left_ids, tok.mask_token_id, *right_ids, tok.sep_token_id], 1 + len(left_ids)

    def _paper_row(self, example: Example) -> tuple[list[int], int]:
        """LM-BFF's tokenize_multipart_input: each template part tokenised alone (a one-character literal is that
        token), sentence 0 capped at first_sent_limit tokens and the others at other_sent_limit, then the row's tail
        cut at max_length when that takes only sentence tokens and the closing </s>; else (where LM-BFF would lose
        the template or the mask) the longest sentence is shortened at its end."""
        tok = self.tokenizer
        settings = self.task.paper_settings()
        special = {"cls": tok.cls_token_id, "mask": tok.mask_token_id, "sep": tok.sep_token_id,
                   "sep+": tok.sep_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
        pieces = []
        for kind, text, sentence in self.task.template_parts(example):
            if kind == "special":
                ids = [special[text]]
            elif kind == "text":
                ids = [tok.convert_tokens_to_ids(text)] if len(text) == 1 else self._encode(text)
            else:
                limit = settings["first_sent_limit"] if sentence == 0 else settings["other_sent_limit"]
                ids = self._encode(text)[:limit]
            pieces.append((kind, text, ids))
        row = [i for _, _, ids in pieces for i in ids]
        if len(row) > self.max_length:
            tail = [(k, t) for k, t, ids in pieces for _ in ids][self.max_length:]
            if tail[-1] in (("special", "sep"), ("special", "sep+")):
                tail = tail[:-1]  # the closing </s>
            if all(kind == "sent" for kind, _ in tail):
                row = row[:self.max_length]
            else:
                sentences = [i for i, (kind, _, _) in enumerate(pieces) if kind == "sent"]
                while (excess := sum(len(ids) for _, _, ids in pieces) - self.max_length) > 0:
                    longest = max(sentences, key=lambda i: (len(pieces[i][2]), -i), default=None)
                    if longest is None or not pieces[longest][2]:
                        raise ValueError(f"task {self.task.name}: the template alone is longer than "
                                         f"task.max_length={self.max_length}")
                    kind, text, ids = pieces[longest]
                    pieces[longest] = (kind, text, ids[:max(len(ids) - excess, 0)])
                row = [i for _, _, ids in pieces for i in ids]
        return row, row.index(tok.mask_token_id)

    def collate(self, examples: list[Example], train: bool) -> dict[str, Any]:
        rows, where = zip(*(self.row(ex) for ex in examples))
        input_ids, attention_mask = _pad(list(rows), self.tokenizer.pad_token_id)
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
    if kind == "masked_lm" and type(task).masked_parts is Task.masked_parts:
        raise ValueError(f"task {task.name} has no masked-LM (LM-BFF) template; use a causal LM (model=opt-*) "
                         f"or an LM-BFF task (e.g. task={task.name}-k512)")
    if task.protocol == "paper" and kind not in task.paper_models:
        raise ValueError(f"task.protocol=paper reproduces {task.paper}, for a {' or '.join(task.paper_models)}: "
                         f"task {task.name} with model {model_name} (a {kind}) has no reference inputs; use "
                         "task.protocol=dpft")


def build_scorer(kind: str, task: Task, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 max_new_tokens: int = 50) -> Scorer:
    scorer = SCORERS[kind](task=task, tokenizer=tokenizer, max_length=max_length)
    if isinstance(scorer, CausalLMScorer):
        scorer.max_new_tokens = max_new_tokens
    record = task.protocol_record(max_length, max_new_tokens)
    if task.protocol == "paper" and not record["as_paper"]:
        log.warning("task.protocol=paper with %s: the reference used %s; longer examples are cut where the "
                    "reference's were not", {k: record[k] for k in record if f"paper_{k}" in record},
                    {k[6:]: v for k, v in record.items() if k.startswith("paper_")})
    return scorer
