"""The parts every task family shares: `Example`, the `Task` base class (which registers each named
subclass in `TASKS`), the data mirror and the template helpers. The families (`dpft.data.mezo`,
`dpft.data.kshot`) build on this module; `dpft.data.tasks` imports them and builds tasks by name, so no
family imports the registry back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

DATA_ENV = "DPFT_DATA_DIR"

Split = Literal["train", "val", "test"]


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
    metric: ClassVar[Literal["accuracy", "f1"]] = "accuracy"
    label_words: ClassVar[tuple[str, ...]] = ()  # classification only
    hub_id: ClassVar[tuple[str, ...]] = ()  # e.g. ("super_glue", "rte") for the error hint / Hub loading
    option_names: ClassVar[tuple[str, ...]] = ()  # the ``options`` a family understands

    data_seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # family base classes have no name and are not registered
            TASKS[cls.name] = cls

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(self.option_names))
        if unknown:
            raise ValueError(f"task {self.name}: unknown options {unknown}; valid: {list(self.option_names)}")

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
    def causal_prompt(self, ex: Example) -> str:
        raise NotImplementedError

    def causal_continuations(self, ex: Example) -> list[str]:
        """Classification: one per label word; multiple choice: one per candidate;
        generation: the gold answer used for teacher forcing (first answer)."""
        raise NotImplementedError

    def masked_prompt(self, ex: Example) -> tuple[str, str]:
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
