"""LM-BFF k-shot tasks (Gao et al. 2021; MeZO ``medium_models``): ``<task>-k16`` / ``<task>-k512``.

Files: ``$DPFT_DATA_DIR/<DIR>/k-shot-1k-test/<k>-<seed>/{train,dev,test}.{tsv,csv}`` (k examples per
class in train and in dev; test at most 1000 examples, the same for every seed), data seeds
13/21/42/87/100. ``options``: ``full_test=True`` reads the complete original test set instead
(e.g. SST-5's 2,210 sentences), where the mirror has it.

Masked-LM templates and label words are the ``run_fewshot.sh`` ones, rendered by ``render_lmbff``.
Label indices follow the LM-BFF/GLUE processors' ``get_labels()`` order, the same for every file of
a task: SST-2 0 terrible / 1 great; SST-5 0..4 terrible/bad/okay/good/great; MNLI/SNLI 0 contradiction
(No) / 1 entailment (Yes) / 2 neutral (Maybe) (HF's glue/mnli order differs: entailment 0, neutral 1,
contradiction 2); RTE/QNLI 0 entailment (Yes) / 1 not_entailment (No); QQP 0 No / 1 Yes (duplicate);
TREC 0..5 Description/Entity/Expression/Human/Location/Number (DESC/ENTY/ABBR/HUM/LOC/NUM). Causal templates (ours; MeZO's OPT code has none for these):
SST-2/SST-5 use the masked template's text before ``<mask>`` (for SST-2 that is MeZO's SST2Template);
the sentence-pair tasks cannot (the second sentence comes after the mask), so RTE uses MeZO's
RTETemplate, MNLI/SNLI MeZO's CBTemplate (same Yes/No/Maybe words), QNLI/QQP similar Yes/No prompts;
TREC uses ``"<question> Answer type:" + " <word>"``.

``protocol="paper"`` renders a masked-LM input as LM-BFF's ``tokenize_multipart_input`` does (the raw
sentences with their outer whitespace, each template part tokenised alone, ``run_fewshot.sh``'s sentence
limits and ``--max_seq_len``: `Spec.paper`); ``dpft`` strips the sentences and tokenises the rendered text
(docs/protocols.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dpft.data.readers import Column, read_table
from dpft.data.task_base import Example, Rendered, Split, Task, data_dir, missing_file, render

SEEDS = (13, 21, 42, 87, 100)
KS = (16, 512)


@dataclass(frozen=True)
class Spec:
    folder: str
    files: tuple[str, str, str]  # train, val, test file names in <k>-<seed>/
    columns: tuple[Column, Column | None, Column]  # (sentence 1, sentence 2 or None, label)
    labels: tuple[str, ...]  # label values as written in the files, in label-index order
    words: tuple[str, ...]  # LM-BFF label words, same order
    template: str  # LM-BFF template
    causal: str | None  # causal prompt over the fields; None = masked template's left part
    full_test: tuple[str, tuple[Column, Column | None, Column]]  # complete original test file
    # run_fewshot.sh's --max_seq_length 128 and the task's TASK_EXTRA: (max_seq_len, first_sent_limit, other_sent_limit)
    paper: tuple[int, int | None, int | None] = (128, None, None)


_PAIR_NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
_RTE_CAUSAL = "{sentence1}\nDoes this mean that \"{sentence2}\" is true? Yes or No?\n"
_GLUE_NLI = ("index", "sentence1", "sentence2", "label")
SPECS: dict[str, Spec] = {
    "sst2": Spec("SST-2", ("train.tsv", "dev.tsv", "test.tsv"), ("sentence", None, "label"), ("0", "1"),
                 ("terrible", "great"), "*cls**sent_0*_It_was*mask*.*sep+*", None,
                 ("SST-2/dev.tsv", ("sentence", None, "label"))),
    "sst5": Spec("SST-5", ("train.csv", "dev.csv", "test.csv"), (1, None, 0), ("0", "1", "2", "3", "4"),
                 ("terrible", "bad", "okay", "good", "great"), "*cls**sent_0*_It_was*mask*.*sep+*", None,
                 ("SST-5/test.tsv", (1, None, 0)), (128, 110, 20)),
    "snli": Spec("SNLI", ("train.tsv", "dev.tsv", "test.tsv"), ("sentence1", "sentence2", -1),
                 ("contradiction", "entailment", "neutral"), ("No", "Yes", "Maybe"), _PAIR_NLI,
                 "Suppose {sentence1} Can we infer that \"{sentence2}\"? Yes, No, or Maybe?\n",
                 ("SNLI/test.tsv", ("sentence1", "sentence2", -1)), (256, None, None)),
    "mnli": Spec("MNLI", ("train.tsv", "dev_matched.tsv", "test_matched.tsv"), ("sentence1", "sentence2", -1),
                 ("contradiction", "entailment", "neutral"), ("No", "Yes", "Maybe"), _PAIR_NLI,
                 "Suppose {sentence1} Can we infer that \"{sentence2}\"? Yes, No, or Maybe?\n",
                 ("MNLI/dev_matched.tsv", ("sentence1", "sentence2", -1)), (256, 240, None)),
    "rte": Spec("RTE", ("train.tsv", "dev.tsv", "test.tsv"), ("sentence1", "sentence2", "label"),
                ("entailment", "not_entailment"), ("Yes", "No"), _PAIR_NLI, _RTE_CAUSAL,
                ("RTE/glue/dev.tsv", ("sentence1", "sentence2", "label")), (256, 240, None)),
    "qnli": Spec("QNLI", ("train.tsv", "dev.tsv", "test.tsv"), ("question", "sentence", "label"),
                 ("entailment", "not_entailment"), ("Yes", "No"), _PAIR_NLI,
                 "Question: {sentence1}\nSentence: {sentence2}\nDoes the sentence answer the question? Yes or No?\n",
                 ("QNLI/dev.tsv", ("question", "sentence", "label"))),
    "qqp": Spec("QQP", ("train.tsv", "dev.tsv", "test.tsv"), ("question1", "question2", "is_duplicate"),
                ("0", "1"), ("No", "Yes"), "*cls**sent_0**mask*,*+sentl_1**sep+*",
                "Question 1: {sentence1}\nQuestion 2: {sentence2}\nDo both questions ask the same thing? Yes or No?\n",
                ("QQP/dev.tsv", ("question1", "question2", "is_duplicate"))),
    "trec": Spec("TREC", ("train.csv", "dev.csv", "test.csv"), (1, None, 0), ("0", "1", "2", "3", "4", "5"),
                 ("Description", "Entity", "Expression", "Human", "Location", "Number"),
                 "*cls**mask*:*+sent_0**sep+*", "{sentence} Answer type:", ("TREC/test.csv", (1, None, 0)),
                 (128, 110, None)),
}

_SENT = re.compile(r"(\+?)sent([lu]?)(-?)_(\d+)")
SPECIAL = ("cls", "mask", "sep", "sep+", "bos", "eos")


def lmbff_parts(template: str, sentences: list[str]) -> list[tuple[str, str, int | None]]:
    """An LM-BFF template's parts in order: ("special", name, None), ("text", literal, None) or
    ("sent", the sentence as the part writes it, its index).

    ``sent_i`` sentence i; ``+`` prefix adds a space; ``l``/``u`` lower/upper-cases its first character;
    ``-`` drops its last character; other parts are literal text with ``_`` for spaces.
    """
    parts: list[tuple[str, str, int | None]] = []
    for part in template.split("*"):
        if part in SPECIAL:
            parts.append(("special", part, None))
        elif m := _SENT.fullmatch(part):
            space, case, cut, i = m.groups()
            text = sentences[int(i)]
            text = {"l": text[:1].lower(), "u": text[:1].upper(), "": text[:1]}[case] + text[1:]
            parts.append(("sent", " " * len(space) + (text[:-1] if cut else text), int(i)))
        elif part:
            parts.append(("text", part.replace("_", " "), None))
    return parts


def render_lmbff(template: str, sentences: list[str]) -> tuple[Rendered, Rendered]:
    """An LM-BFF template as text (left of ``*mask*``, right of it), special tokens dropped, the sentences as the
    fields."""
    sides = [Rendered(""), Rendered("")]
    side = 0
    for kind, text, _ in lmbff_parts(template, sentences):
        if kind == "special":
            side = 1 if text == "mask" else side
        else:
            sides[side] += render("{s}", s=text) if kind == "sent" else text
    return sides[0], sides[1]


@dataclass
class KShotTask(Task):
    kind = "classification"
    option_names = ("full_test",)
    base: ClassVar[str]
    k: ClassVar[int]
    spec: ClassVar[Spec]

    data_seed: int = 42
    paper = "LM-BFF run_fewshot.sh, src/processors.py, src/dataset.py (DPZero's roberta/, MeZO's medium_models/)"
    paper_models = ("masked_lm",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data_seed not in SEEDS:
            raise ValueError(f"task {self.name}: data_seed {self.data_seed} has no LM-BFF split; "
                             f"valid data seeds: {SEEDS}")

    def paper_settings(self) -> dict[str, Any]:
        max_length, first, other = self.spec.paper
        return {"max_length": max_length, "first_sent_limit": first, "other_sent_limit": other}

    def splits(self, needed: tuple[Split, ...] = ("train", "val", "test")) -> dict[Split, list[Example]]:
        return {split: self._read(split) for split in needed}

    def check_files(self, needed: tuple[Split, ...]) -> None:
        for split in needed:
            self._path(split)

    def train_size(self) -> int:
        # k per label, or fewer where a class has fewer (TREC): the file says; a small table, read in a moment
        return len(self._read("train"))

    def _path(self, split: Split) -> tuple[Path, tuple]:
        """The split's file and its columns."""
        spec = self.spec
        if split == "test" and self.options.get("full_test"):
            rel, columns = spec.full_test
        else:
            file = spec.files[("train", "val", "test").index(split)]
            rel, columns = f"{spec.folder}/k-shot-1k-test/{self.k}-{self.data_seed}/{file}", spec.columns
        root = data_dir()
        path = None if root is None else root / rel
        if path is None or not path.is_file():
            raise missing_file(path or rel, rel, None)  # LM-BFF splits exist only as files
        return path, columns

    def _read(self, split: Split) -> list[Example]:
        spec = self.spec
        path, columns = self._path(split)
        out = []
        # LM-BFF's processors keep a sentence's outer whitespace (the paper protocol); ours strip it
        for i, (a, b, y) in enumerate(read_table(path, columns, strip=self.protocol != "paper")):
            if y not in spec.labels:
                raise ValueError(f"{path} row {i}: label {y!r} is not one of {spec.labels}")
            fields = {"sentence": a} if b is None else {"sentence1": a, "sentence2": b}
            out.append(Example(fields=fields, label=spec.labels.index(y), uid=f"{split}-{i}"))
        return out

    def _sentences(self, ex: Example) -> list[str]:
        f = ex.fields
        return [f["sentence"]] if "sentence" in f else [f["sentence1"], f["sentence2"]]

    def masked_parts(self, ex: Example) -> tuple[Rendered, Rendered]:
        return render_lmbff(self.spec.template, self._sentences(ex))

    def template_parts(self, ex: Example) -> list[tuple[str, str, int | None]]:
        """The LM-BFF template's parts for this example (`lmbff_parts`)."""
        return lmbff_parts(self.spec.template, self._sentences(ex))

    def causal_parts(self, ex: Example) -> tuple[Rendered, str, list[str]]:
        encoded = self.masked_parts(ex)[0] if self.spec.causal is None else render(self.spec.causal, **ex.fields)
        return encoded, "" if encoded.text.endswith("\n") else " ", list(self.label_words)

    def text_pair(self, ex: Example) -> tuple[str, str | None]:
        s = self._sentences(ex)
        return s[0], s[1] if len(s) > 1 else None

    def label_descriptions(self) -> list[str]:
        """The LM-BFF template with empty sentences and the label word at the mask: SST-2 "It was great."."""
        left, right = render_lmbff(self.spec.template, [""] * (1 + (self.spec.columns[1] is not None)))
        return [" ".join(f"{left.text.strip()} {word}{right.text.rstrip()}".split()) for word in self.label_words]


for _base, _spec in SPECS.items():
    for _k in KS:
        type(f"KShot_{_base}_{_k}", (KShotTask,), {
            "name": f"{_base}-k{_k}", "base": _base, "k": _k, "spec": _spec, "label_words": _spec.words,
            "__module__": __name__,
        })
