"""MeZO/OPT protocol tasks (MeZO ``large_models``: tasks.py, templates.py, run.py).

Split protocol: ``val`` (``num_dev``, default 500; CB and COPA 100) and ``train`` (``num_train``,
default 1000) are drawn without overlap from the original train split with
``random.Random(data_seed)``; ``test`` is ``num_test`` (default 1000) examples of the original
validation split (all of it when smaller, in file order). The val draw comes first, so val is the
same for every ``num_train`` and larger train sets extend smaller ones. (MeZO itself draws with a
numpy permutation and cuts dev off the end of the train draw, so the exact samples differ.)

Rows are read from ``$DPFT_DATA_DIR`` and converted to the Hugging Face row format first, so the
local files and the Hub (``datasets.load_dataset(*hub_id, split=...)``, used when ``$DPFT_DATA_DIR``
is unset) go through the same ``example(row)``. Templates are MeZO's, verbatim; see ``split_prompt``
for how MeZO's ``verbalize`` maps onto (``causal_prompt``, ``causal_continuations``).

``protocol="paper"`` gives the rows MeZO's code read (HF's ``boolq`` passage without its title, ReCoRD's
training gold the first of HF's sorted answers, DROP's golds per split as HF's builder gives them); the WSC
span fix of HF's ``wsc.fixed`` applies under both protocols (docs/protocols.md).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

from dpft.data.readers import read_json, read_jsonl, read_table
from dpft.data.task_base import (
    DATA_ENV,
    Example,
    MissingDataError,
    Rendered,
    Split,
    Task,
    data_dir,
    dedupe,
    missing_file,
    render,
)

Original = Literal["train", "validation"]


class MezoTask(Task):
    """One MeZO/OPT task: file locations, row conversion and the causal template."""

    files: ClassVar[dict[Original, str]]  # relative to $DPFT_DATA_DIR
    raw_labels: ClassVar[tuple[Any, ...]] = ()  # local-file label values in label-index order
    num_dev: ClassVar[int] = 500
    train_pool: ClassVar[int]  # examples in the original train split (what `load_original("train")` returns)
    sep: ClassVar[str] = ""  # MeZO's verbalize = encode + sep + option
    missing_note: ClassVar[str] = ""
    option_names = ("num_train", "num_dev", "num_test")
    paper = "MeZO large_models/ (templates.py, tasks.py, run.py, utils.encode_prompt); DPZero's opt/ is the same code"
    paper_models = ("causal_lm",)

    def paper_settings(self) -> dict[str, Any]:
        return {"max_length": 2048, "max_new_tokens": 50}  # run.py's defaults, kept by mezo.sh and dpzero.sh

    # --- data -------------------------------------------------------------------------------
    def splits(self, needed: tuple[Split, ...] = ("train", "val", "test")) -> dict[Split, list[Example]]:
        out: dict[Split, list[Example]] = {}
        if "train" in needed or "val" in needed:
            pool = self.load_original("train")
            order = list(range(len(pool)))
            random.Random(self.data_seed).shuffle(order)
            n_dev = min(self.options.get("num_dev", self.num_dev), len(pool))
            n_train = min(self.options.get("num_train", 1000), len(pool) - n_dev)
            picks = {"val": order[:n_dev], "train": order[n_dev:n_dev + n_train]}
            out.update({s: [pool[i] for i in picks[s]] for s in ("train", "val") if s in needed})
        if "test" in needed:
            pool = self.load_original("validation")
            n = min(self.options.get("num_test", 1000), len(pool))
            idx = sorted(random.Random(self.data_seed).sample(range(len(pool)), n)) if n < len(pool) else range(n)
            out["test"] = [pool[i] for i in idx]
        return out

    def check_files(self, needed: tuple[Split, ...]) -> None:
        root = data_dir()
        originals = (["train"] if {"train", "val"} & set(needed) else []) + (["validation"] if "test" in needed else [])
        for split in originals if root is not None else ():
            if not (root / self.files[split]).is_file():
                raise missing_file(root / self.files[split], self.files[split], "/".join(self.hub_id), self.missing_note)

    def train_size(self) -> int:
        n_dev = min(self.options.get("num_dev", self.num_dev), self.train_pool)
        return min(self.options.get("num_train", 1000), self.train_pool - n_dev)

    def load_original(self, split: Original) -> list[Example]:
        """Every example of the original ``train`` or ``validation`` split, in file order."""
        root = data_dir()
        if root is None:
            rows: Iterable[dict] = self.hub_rows(split)
        else:
            path = root / self.files[split]
            if not path.is_file():
                raise missing_file(path, self.files[split], "/".join(self.hub_id), self.missing_note)
            rows = self.local_rows(path, split)
        return [ex for ex in map(self.example, rows) if ex is not None]

    def hub_rows(self, split: Original, hub_id: tuple[str, ...] | None = None) -> list[dict]:
        hub_id = hub_id or self.hub_id
        hub = "/".join(hub_id)
        try:
            import datasets

            return list(datasets.load_dataset(*hub_id, split=split))
        except Exception as err:  # offline, renamed dataset, script datasets refused, ...
            raise MissingDataError(
                f"could not load {hub} ({split}) from the Hugging Face Hub: {err!r}. Set {DATA_ENV} to a "
                f"local mirror (e.g. ../shared/data) containing {self.files[split]}.") from err

    def local_rows(self, path: Path, split: Original) -> Iterable[dict]:
        """Rows of a SuperGLUE jsonl file in HF format (label strings/bools -> ints)."""
        for row in read_jsonl(path):
            if "label" in row:
                label = row["label"]
                row = {**row, "label": self.raw_labels.index(label) if self.raw_labels else int(label)}
            yield row

    def example(self, row: dict) -> Example | None:
        raise NotImplementedError

    # --- templates --------------------------------------------------------------------------
    def encode(self, ex: Example) -> Rendered:
        """MeZO's ``template.encode(sample)``."""
        raise NotImplementedError

    def options_of(self, ex: Example) -> list[str]:
        """What MeZO's ``verbalize`` appends after ``encode + sep`` for each candidate."""
        return list(self.label_words)

    def causal_parts(self, ex: Example) -> tuple[Rendered, str, list[str]]:
        return self.encode(ex), self.sep, self.options_of(ex)


class Classification(MezoTask):
    """``text_pair`` (for a classification head; MeZO has none): the task's two texts, e.g.
    (premise, hypothesis); WSC (text, "<pronoun>: <candidate referent>"), WiC ("<word>: <sentence1>",
    sentence2) and MultiRC (paragraph, "<question> <answer option>") are ours."""

    kind = "classification"
    text_fields: ClassVar[tuple[str, str | None]]  # the fields text_pair returns

    def example(self, row: dict) -> Example:
        fields = {k: v for k, v in row.items() if k not in ("label", "idx")}
        return Example(fields=fields, label=row.get("label"), uid=str(row.get("idx", "")))

    def text_pair(self, ex: Example) -> tuple[str, str | None]:
        a, b = self.text_fields
        return ex.fields[a], None if b is None else ex.fields[b]


class NotClassification(MezoTask):
    def text_pair(self, ex: Example) -> tuple[str, str | None]:
        raise NotImplementedError(f"task {self.name} is a {self.kind} task: no text pair for a classification head")

    def masked_parts(self, ex: Example) -> tuple[Rendered, Rendered]:
        raise NotImplementedError(f"task {self.name} is a {self.kind} task: no masked-LM (LM-BFF) template")


# --- classification -----------------------------------------------------------------------------
class SST2(Classification):
    name = "sst2"
    hub_id = ("glue", "sst2")
    files = {"train": "SST-2/train.tsv", "validation": "SST-2/dev.tsv"}
    train_pool = 67_349
    label_words = ("terrible", "great")
    sep = " "
    text_fields = ("sentence", None)

    def local_rows(self, path: Path, split: Original) -> Iterable[dict]:
        for i, (sentence, _, label) in enumerate(read_table(path, ("sentence", None, "label"))):
            yield {"sentence": sentence, "label": int(label), "idx": i}

    def encode(self, ex: Example) -> Rendered:
        return render("{sentence} It was", sentence=ex.fields["sentence"].strip())

    def masked_parts(self, ex: Example) -> tuple[Rendered, Rendered]:  # LM-BFF *cls**sent_0*_It_was*mask*.*sep+*
        return self.encode(ex), Rendered(".")


class RTE(Classification):
    name = "rte"
    hub_id = ("super_glue", "rte")
    files = {"train": "RTE/train.jsonl", "validation": "RTE/val.jsonl"}
    train_pool = 2_490
    raw_labels = ("entailment", "not_entailment")
    label_words = ("Yes", "No")
    text_fields = ("premise", "hypothesis")

    def encode(self, ex: Example) -> Rendered:
        return render("{premise}\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\n", **ex.fields)


class CB(Classification):
    name = "cb"
    hub_id = ("super_glue", "cb")
    files = {"train": "CB/train.jsonl", "validation": "CB/val.jsonl"}
    train_pool = 250
    raw_labels = ("entailment", "contradiction", "neutral")
    label_words = ("Yes", "No", "Maybe")
    num_dev = 100
    text_fields = ("premise", "hypothesis")

    def encode(self, ex: Example) -> Rendered:
        return render("Suppose {premise} Can we infer that \"{hypothesis}\"? Yes, No, or Maybe?\n", **ex.fields)


class BoolQ(Classification):
    name = "boolq"
    hub_id = ("super_glue", "boolq")
    files = {"train": "BoolQ/train.jsonl", "validation": "BoolQ/val.jsonl"}
    train_pool = 9_427  # SuperGLUE BoolQ train (not in the mirror)
    label_words = ("No", "Yes")  # label 1 = true
    text_fields = ("passage", "question")
    missing_note = " (BoolQ/fewglue_32dev/train.jsonl has only 32 examples and is not used.)"

    def local_rows(self, path: Path, split: Original) -> Iterable[dict]:
        for row in super().local_rows(path, split):
            # SuperGLUE's passage is the original BoolQ's "<title> -- <passage>"; MeZO loads HF's `boolq`, which
            # has no title
            yield {**row, "passage": row["passage"].split(" -- ", 1)[-1]} if self.protocol == "paper" else row

    def hub_rows(self, split: Original, hub_id: tuple[str, ...] | None = None) -> list[dict]:
        if self.protocol != "paper":
            return super().hub_rows(split)
        return [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"]), "idx": i}
                for i, r in enumerate(super().hub_rows(split, ("boolq",)))]

    def encode(self, ex: Example) -> Rendered:
        # BoolQTemplateV3: MeZO's BoolQDataset.get_template() defaults to template_version=2
        question = ex.fields["question"]
        question = question if question.endswith("?") else question + "?"
        return render("{passage} {question}\n", passage=ex.fields["passage"],
                      question=question[0].upper() + question[1:])


def fix_wsc_spans(row: dict) -> dict:
    """HF's ``wsc.fixed`` rows from the original WSC's: a span text that does not occur in the text takes the case
    of the first letter of the word at its index, loses trailing periods and has its newlines turned into spaces
    (the two Kamenev/Zinoviev spans, which no such fix makes occur, stay as they are)."""
    row = dict(row)
    words = row["text"].split()
    for k in ("span1", "span2"):
        span = row[f"{k}_text"]
        if span in row["text"] or span in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue
        first = words[row[f"{k}_index"]][0]
        span = (span[0].lower() if first.islower() else span[0].upper()) + span[1:]
        row[f"{k}_text"] = span.rstrip(".").replace("\n", " ")
    return row


class WSC(Classification):
    name = "wsc"
    hub_id = ("super_glue", "wsc.fixed")  # MeZO loads wsc.fixed; the mirror holds the original WSC (fixed below)
    files = {"train": "WSC/train.jsonl", "validation": "WSC/val.jsonl"}
    train_pool = 554
    label_words = ("No", "Yes")

    def local_rows(self, path: Path, split: Original) -> Iterable[dict]:
        for row in super().local_rows(path, split):
            yield fix_wsc_spans({**{k: v for k, v in row.items() if k != "target"}, **row["target"]})

    def encode(self, ex: Example) -> Rendered:
        f = ex.fields
        return render("{text}\nIn the previous sentence, does the pronoun \"{span2}\" refer to {span1}? Yes or No?\n",
                      text=f["text"], span2=f["span2_text"].lower(), span1=f["span1_text"])

    def text_pair(self, ex: Example) -> tuple[str, str | None]:
        return ex.fields["text"], f"{ex.fields['span2_text']}: {ex.fields['span1_text']}"


class WiC(Classification):
    name = "wic"
    hub_id = ("super_glue", "wic")
    files = {"train": "WiC/train.jsonl", "validation": "WiC/val.jsonl"}
    train_pool = 5_428
    label_words = ("No", "Yes")

    def encode(self, ex: Example) -> Rendered:
        f = ex.fields
        return render("Does the word \"{word}\" have the same meaning in these two sentences? Yes, No?\n"
                      "{sentence1}\n{sentence2}\n", word=f["word"], sentence1=f["sentence1"], sentence2=f["sentence2"])

    def text_pair(self, ex: Example) -> tuple[str, str | None]:
        return f"{ex.fields['word']}: {ex.fields['sentence1']}", ex.fields["sentence2"]


class MultiRC(Classification):
    name = "multirc"
    hub_id = ("super_glue", "multirc")
    files = {"train": "MultiRC/train.jsonl", "validation": "MultiRC/val.jsonl"}
    train_pool = 27_243  # one example per (question, answer option)
    label_words = ("No", "Yes")

    def local_rows(self, path: Path, split: Original) -> Iterable[dict]:
        # one row per (paragraph, question, answer option), as HF super_glue/multirc
        for row in read_jsonl(path):
            for q in row["passage"]["questions"]:
                for a in q["answers"]:
                    yield {"paragraph": row["passage"]["text"], "question": q["question"], "answer": a["text"],
                           "idx": {"paragraph": row["idx"], "question": q["idx"], "answer": a["idx"]},
                           "label": int(a["label"]) if "label" in a else None}

    def example(self, row: dict) -> Example:
        idx = row["idx"]
        uid = f"{idx['paragraph']}-{idx['question']}-{idx['answer']}"
        return Example(fields={k: row[k] for k in ("paragraph", "question", "answer")}, label=row["label"], uid=uid)

    def encode(self, ex: Example) -> Rendered:
        return render("{paragraph}\nQuestion: {question}\nI found this answer \"{answer}\". Is that correct? "
                      "Yes or No?\n", **ex.fields)

    def text_pair(self, ex: Example) -> tuple[str, str | None]:
        return ex.fields["paragraph"], f"{ex.fields['question']} {ex.fields['answer']}"


# --- multiple choice ------------------------------------------------------------------------------
class COPA(NotClassification):
    name = "copa"
    kind = "multiple_choice"
    hub_id = ("super_glue", "copa")
    files = {"train": "COPA/train.jsonl", "validation": "COPA/val.jsonl"}
    train_pool = 400
    num_dev = 100

    def example(self, row: dict) -> Example:
        fields = {k: row[k] for k in ("premise", "choice1", "choice2", "question")}
        return Example(fields=fields, label=row.get("label"), candidates=(row["choice1"], row["choice2"]),
                       uid=str(row["idx"]))

    def encode(self, ex: Example) -> Rendered:
        premise = ex.fields["premise"].rstrip()
        premise = premise[:-1] if premise.endswith(".") else premise
        return render("{premise}" + {"cause": " because ", "effect": " so "}[ex.fields["question"]], premise=premise)

    def options_of(self, ex: Example) -> list[str]:
        # MeZO's "correct" capitalization: lower-case the whole first word unless it is "I"
        def lower_first(c: str) -> str:
            words = c.split(" ")
            return " ".join([words[0] if words[0] == "I" else words[0].lower(), *words[1:]])
        return [lower_first(c) for c in ex.candidates]


class ReCoRD(NotClassification):
    name = "record"
    kind = "multiple_choice"
    hub_id = ("super_glue", "record")
    files = {"train": "ReCoRD/train.jsonl", "validation": "ReCoRD/val.jsonl"}
    train_pool = 100_730  # SuperGLUE ReCoRD train queries, less the few dropped below (not in the mirror)
    sep = " "
    missing_note = " (ReCoRD/fewglue_32dev holds only 32+32 examples and is not used.)"

    def local_rows(self, path: Path, split: Original) -> Iterable[dict]:
        for row in read_jsonl(path):
            text = row["passage"]["text"]
            entities = [text[e["start"]:e["end"] + 1] for e in row["passage"]["entities"]]  # inclusive ends
            for qa in row["qas"]:
                yield {"passage": text, "query": qa["query"], "entities": entities, "idx": qa["idx"],
                       "answers": [a["text"] for a in qa.get("answers", [])]}

    def example(self, row: dict) -> Example:
        candidates, answers = dedupe(row["entities"]), dedupe(row["answers"])
        # the gold candidate training teaches: the first answer in the file's order; under the paper protocol the
        # first of HF's answers, which its builder sorts (MeZO's run.py trains on correct_candidate[0])
        order = sorted(answers) if self.protocol == "paper" else answers
        label = next((candidates.index(a) for a in order if a in candidates), None)
        uid = str(row["idx"]["query"] if isinstance(row["idx"], dict) else row["idx"])
        return Example(fields={"passage": row["passage"], "query": row["query"]}, label=label,
                       candidates=candidates, answers=answers, uid=uid)

    def load_original(self, split: Original) -> list[Example]:
        # training teaches the gold candidate: drop questions whose answer is not among the entities
        examples = super().load_original(split)
        return [ex for ex in examples if ex.label is not None] if split == "train" else examples

    def encode(self, ex: Example) -> Rendered:
        # ReCoRDTemplateGPT3 (what MeZO's ReCoRDDataset.get_template() returns)
        return render("{passage}\n-", passage=ex.fields["passage"].replace("@highlight\n", "- "))

    def options_of(self, ex: Example) -> list[str]:
        return [ex.fields["query"].replace("@placeholder", c) for c in ex.candidates]


# --- generation (scored with SQuAD F1/EM) ---------------------------------------------------------
class Generation(NotClassification):
    kind = "generation"
    metric = "f1"
    sep = " "

    def options_of(self, ex: Example) -> list[str]:
        return [ex.answers[0] + "\n"]  # MeZO's verbalize ends with "\n": the model learns to stop


class SQuAD(Generation):
    name = "squad"
    hub_id = ("squad",)
    files = {"train": "SQuAD/train-v1.1.reconstructed.json", "validation": "SQuAD/dev-v1.1.reconstructed.json"}
    train_pool = 87_599

    def local_rows(self, path: Path, split: Original) -> Iterable[dict]:
        for article in read_json(path)["data"]:
            for par in article["paragraphs"]:
                for qa in par["qas"]:
                    yield {"id": qa["id"], "title": article["title"], "context": par["context"],
                           "question": qa["question"], "answers": {"text": [a["text"] for a in qa["answers"]]}}

    def example(self, row: dict) -> Example:
        return Example(fields={k: row[k] for k in ("title", "context", "question")},
                       answers=dedupe(row["answers"]["text"]), uid=row["id"])

    def encode(self, ex: Example) -> Rendered:
        f = ex.fields
        return render("Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:", title=f["title"],
                      context=f["context"], question=f["question"].strip())


class DROP(Generation):
    name = "drop"
    hub_id = ("drop",)
    files = {"train": "DROP/drop_dataset_train.json", "validation": "DROP/drop_dataset_dev.json"}
    train_pool = 77_409  # DROP v1.0 train questions (not in the mirror)
    missing_note = (" The partial files under DROP/ (300 train questions, the contrast set) are not DROP splits "
                    "and are never used as such.")

    def local_rows(self, path: Path, split: Original) -> Iterable[dict]:
        # official DROP json -> HF ``drop`` rows, each number/date as one string and each span of a multi-span
        # answer separately (as HF's builder does). The golds: the answer and the validated answers, as DROP's own
        # evaluation reads them; under the paper protocol HF's: the answer in train, the validated answers only in
        # validation, and no question whose answer is both a number and a date or text
        for section_id, section in read_json(path).items():
            for qa in section["qa_pairs"]:
                if self.protocol == "paper":
                    answers, strict = ([qa["answer"]] if split == "train" else qa.get("validated_answers", [])), True
                else:
                    answers, strict = [qa["answer"], *qa.get("validated_answers", [])], False
                spans: list[str] | None = []
                for ans in answers:
                    date = " ".join(ans.get("date", {}).get(k, "") for k in ("day", "month", "year")).strip()
                    kinds = [bool(ans.get("number")), bool(date), bool(ans.get("spans"))]
                    if strict and sum(kinds) > 1:
                        spans = None  # HF's builder skips the question
                        break
                    spans += [ans["number"]] if kinds[0] else ans.get("spans") or ([date] if date else [])
                if spans is not None:
                    yield {"section_id": section_id, "query_id": qa["query_id"], "passage": section["passage"],
                           "question": qa["question"], "answers_spans": {"spans": spans}}

    def example(self, row: dict) -> Example | None:
        spans = row["answers_spans"]["spans"]
        # HF's builder keeps every span as it is (MeZO trains on the first); ours drop empty and repeated ones
        answers = tuple(spans) if self.protocol == "paper" else dedupe(s for s in spans if s.strip())
        if not answers:  # a handful of DROP questions have no usable answer; HF's builder skips them too
            return None
        return Example(fields={"passage": row["passage"], "question": row["question"]}, answers=answers,
                       uid=row["query_id"])

    def encode(self, ex: Example) -> Rendered:
        return render("Passage: {passage}\nQuestion: {question}\nAnswer:", passage=ex.fields["passage"],
                      question=ex.fields["question"].strip())
