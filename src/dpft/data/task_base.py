"""The parts every task family shares: `Example`, the `Task` base class (which registers each named
subclass in `TASKS`), the data mirror and the template helpers. The families (`dpft.data.mezo`,
`dpft.data.kshot`) build on this module; `dpft.data.tasks` imports them and builds tasks by name, so no
family imports the registry back.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

DATA_ENV = "DPFT_DATA_DIR"

Split = Literal["train", "val", "test"]
# `task.protocol`: `paper` feeds the model the token ids of the papers' reference code (MeZO's for the MeZO tasks,
# LM-BFF's for the k-shot ones: docs/protocols.md); `dpft`, the default for new work, differs where noted there
PROTOCOLS = ("dpft", "paper")


@dataclass(frozen=True)
class Example:
    """One evaluation/training unit.

    ``label`` indexes ``Task.label_words`` (classification) or ``candidates`` (multiple choice).
    ``answers`` holds every gold answer string (generation; also gold candidates for ReCoRD, where
    ``label`` is the first gold candidate, or None when no gold answer is among the candidates).
    """

    fields: dict[str, Any]
    label: int | None = None
    candidates: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()
    uid: str = ""


class ExampleBatch:
    """A batch's examples, in order. Not a sequence or a dataclass to Lightning: its precision plugins convert
    every tensor of a batch with `apply_to_collection`, which rebuilds sequences and dataclasses and fails on
    frozen ones (every `trainer.precision` but 32); an opaque container is passed through as it is."""

    __slots__ = ("_examples",)

    def __init__(self, examples: Iterable[Example] = ()):
        self._examples = tuple(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __iter__(self):
        return iter(self._examples)

    def __getitem__(self, index):
        return self._examples[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExampleBatch) and self._examples == other._examples

    def __repr__(self) -> str:
        return f"ExampleBatch({len(self)} examples)"


@dataclass(frozen=True)
class Rendered:
    """A prompt's text and the character spans of the example's own text in it; the rest is the template, which
    truncation never cuts (`dpft.models.scoring.shorten`)."""

    text: str
    fields: tuple[tuple[int, int], ...] = ()

    def __add__(self, other: Rendered | str) -> Rendered:
        other = other if isinstance(other, Rendered) else Rendered(other)
        n = len(self.text)
        return Rendered(self.text + other.text, self.fields + tuple((s + n, e + n) for s, e in other.fields))

    def __radd__(self, other: str) -> Rendered:
        return Rendered(other) + self

    def clip(self, start: int, end: int) -> Rendered:
        """The text[start:end] with its fields clipped to it."""
        fields = tuple((max(s, start) - start, min(e, end) - start) for s, e in self.fields if min(e, end) > max(s, start))
        return Rendered(self.text[start:end], fields)

    def strip(self, chars: str | None = None) -> Rendered:
        start = len(self.text) - len(self.text.lstrip(chars))
        return self.clip(start, max(len(self.text.rstrip(chars)), start))

    def lstrip(self, chars: str | None = None) -> Rendered:
        return self.clip(len(self.text) - len(self.text.lstrip(chars)), len(self.text))

    def rstrip(self, chars: str | None = None) -> Rendered:
        return self.clip(0, len(self.text.rstrip(chars)))

    def cut(self, index: int, end: int) -> Rendered:
        """Field `index` ended at character `end` (its rest removed)."""
        s, e = self.fields[index]
        gone = e - end
        fields = tuple((a, end) if i == index else (a - gone, b - gone) if a >= e else (a, b)
                       for i, (a, b) in enumerate(self.fields))
        return Rendered(self.text[:end] + self.text[e:], fields)


def render(template: str, **values: str) -> Rendered:
    """`template.format(**values)` (plain ``{name}`` fields only), with the values' spans as the fields."""
    out = Rendered("")
    for literal, name, _, _ in string.Formatter().parse(template):
        out += literal
        if name is not None:
            out += Rendered(values[name], ((0, len(values[name])),))
    return out


class MissingDataError(FileNotFoundError):
    """A task's files are neither in the local mirror nor reachable on the Hub."""


def data_dir() -> Path | None:
    """The local data mirror (``$DPFT_DATA_DIR``), or None to use the Hugging Face Hub."""
    value = os.environ.get(DATA_ENV, "").strip()
    return Path(value).expanduser() if value else None


@dataclass
class Task:
    """Base class; subclasses register themselves by ``name`` in ``TASKS``."""

    name: ClassVar[str]
    kind: ClassVar[Literal["classification", "multiple_choice", "generation"]]
    paper: ClassVar[str] = ""  # the reference code `protocol="paper"` reproduces
    paper_models: ClassVar[tuple[str, ...]] = ()  # the model kinds that reference code feeds
    metric: ClassVar[Literal["accuracy", "f1"]] = "accuracy"
    label_words: ClassVar[tuple[str, ...]] = ()  # classification only
    hub_id: ClassVar[tuple[str, ...]] = ()  # e.g. ("super_glue", "rte") for the error hint / Hub loading
    option_names: ClassVar[tuple[str, ...]] = ()  # the ``options`` a family understands

    data_seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    protocol: str = "dpft"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # family base classes have no name and are not registered
            TASKS[cls.name] = cls

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(self.option_names))
        if unknown:
            raise ValueError(f"task {self.name}: unknown options {unknown}; valid: {list(self.option_names)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"task {self.name}: task.protocol={self.protocol!r}; valid: {', '.join(PROTOCOLS)}")

    def paper_settings(self) -> dict[str, Any]:
        """What the reference code fixes beyond the templates: its length limits (`max_length`, ...)."""
        return {}

    def protocol_record(self, max_length: int, max_new_tokens: int | None = None) -> dict[str, Any]:
        """What results.json says about a run's inputs: the protocol, the reference code `paper` reproduces, the
        run's lengths and the reference's, and `as_paper`: whether the model read the reference's token ids (the
        paper protocol at the reference's lengths)."""
        lengths = {"max_length": max_length}
        if self.kind == "generation" and max_new_tokens is not None:
            lengths["max_new_tokens"] = max_new_tokens
        paper = {k: v for k, v in self.paper_settings().items() if k in lengths}
        return {"name": self.protocol, "reference": self.paper or None, **lengths,
                **{f"paper_{k}": v for k, v in paper.items()},
                "as_paper": self.protocol == "paper" and all(lengths[k] == v for k, v in paper.items())}

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    # --- data -------------------------------------------------------------------------------
    def splits(self, needed: tuple[Split, ...] = ("train", "val", "test")) -> dict[Split, list[Example]]:
        """The protocol's train/val/test examples (only the ``needed`` ones are read)."""
        raise NotImplementedError

    def check_files(self, needed: tuple[Split, ...]) -> None:
        """Raise `MissingDataError` when the local mirror lacks a file that `splits(needed)` would read (before
        anything loads; without a mirror the Hub is asked when the data load)."""

    def train_size(self) -> int:
        """How many training examples the protocol gives, known before any file is read (so a batch larger
        than the training set is refused before anything loads)."""
        raise NotImplementedError

    # --- templates --------------------------------------------------------------------------
    def causal_parts(self, ex: Example) -> tuple[Rendered, str, list[str]]:
        """MeZO's ``verbalize(sample, c) == encode(sample) + sep + option``: (encode, sep, one option per
        candidate). Classification: the label words; multiple choice: the candidates as the template writes them;
        generation: the gold answer used for teacher forcing (the first answer), ending with a newline."""
        raise NotImplementedError

    def causal_prompt(self, ex: Example) -> str:
        encoded, sep, _ = self.causal_parts(ex)
        return split_prompt(encoded.text, sep, ())[0]

    def causal_continuations(self, ex: Example) -> list[str]:
        """Classification: one per label word; multiple choice: one per candidate;
        generation: the gold answer used for teacher forcing (first answer)."""
        encoded, sep, options = self.causal_parts(ex)
        return split_prompt(encoded.text, sep, options)[1]

    def masked_prompt(self, ex: Example) -> tuple[str, str]:
        left, right = self.masked_parts(ex)
        return left.text, right.text

    def masked_parts(self, ex: Example) -> tuple[Rendered, Rendered]:
        """The masked-LM template's text left and right of ``<mask>`` (special tokens left out)."""
        raise NotImplementedError(f"task {self.name} has no masked-LM (LM-BFF) template")

    def text_pair(self, ex: Example) -> tuple[str, str | None]:
        raise NotImplementedError

    def label_descriptions(self) -> list[str]:
        """One short public text per label (no data): prototypes for a classification head's start."""
        return list(self.label_words)


TASKS: dict[str, type[Task]] = {}


# --- helpers shared by the families ---------------------------------------------------------------
def split_prompt(encoded: str, sep: str, options: Iterable[str]) -> tuple[str, list[str]]:
    """MeZO's ``verbalize(sample, c) == encode(sample) + sep + c`` as (prompt, continuations), with
    trailing spaces of the prompt moved into the continuations so each continuation's first token
    carries its leading space, as it does when the whole string is tokenized ("... because" + " he")."""
    prompt = encoded.rstrip(" ")
    moved = encoded[len(prompt):]
    return prompt, [moved + sep + o for o in options]


def dedupe(items: Iterable[str]) -> tuple[str, ...]:
    """Unique items, first occurrence order."""
    return tuple(dict.fromkeys(items))


def missing_file(path: Path | str, rel: str, hub: str | None, note: str = "") -> MissingDataError:
    where = f"(or unset it to load the Hugging Face Hub dataset {hub})" if hub else \
        "(these files are not on the Hugging Face Hub)"
    return MissingDataError(f"{path} not found. Set {DATA_ENV} to a folder containing {rel} {where}.{note}")
