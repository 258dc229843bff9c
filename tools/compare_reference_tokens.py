"""How many examples get the reference code's token ids from dpft: per task, the examples of a file written by
`tools/reference_tokens.py` (tests/data/reference_tokens.json, or a larger one made with `--all`) whose rows as
dpft's scorer collates them (prompt, every candidate, the scored span, the training row, the mask position and
the label words) equal the reference's.

    DPFT_DATA_DIR=../shared/data .venv/bin/python tools/compare_reference_tokens.py tests/data/reference_tokens.json
    ... --protocol dpft      # the default protocol instead of the paper's
    ... --show 2             # print the first mismatches of every task
    ... --ignore-bos         # an OPT row's first token left out of the comparison (<s> or </s>)

It reads dpft through `collate` only, so it also measures an older checkout (PYTHONPATH=<its src>), which has no
`task.protocol`: there it measures what that code did.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

# the reference's task names -> dpft's
NAMES = {"mezo/SST2": "sst2", "mezo/RTE": "rte", "mezo/CB": "cb", "mezo/Copa": "copa", "mezo/WIC": "wic",
         "mezo/WSC": "wsc", "mezo/MultiRC": "multirc", "mezo/ReCoRD": "record", "mezo/BoolQ": "boolq",
         "mezo/SQuAD": "squad", "mezo/DROP": "drop", "lmbff/SST-2": "sst2-k512", "lmbff/sst-5": "sst5-k512",
         "lmbff/QQP": "qqp-k512", "lmbff/QNLI": "qnli-k512", "lmbff/MNLI": "mnli-k512", "lmbff/SNLI": "snli-k512",
         "lmbff/trec": "trec-k512", "lmbff/RTE": "rte-k512"}
SPLITS = {"train": "train", "dev": "val", "test": "test"}


def dpft_name(key: str) -> str:
    """dpft's task for a fixture task ("mezo/BoolQ@128": BoolQ at another length than the paper's)."""
    return NAMES[key.split("@")[0]]


def reference_rows(example: dict, which: str) -> dict[Any, tuple[list[int], int]]:
    prefix = example.get("prefix", [])
    return {row["key"]: (prefix + row["rest"], row["scored"]) for row in example[which]}


def build(name: str, protocol: str, data_seed: int | None = None):
    from dpft.data.tasks import build_task

    if "protocol" in inspect.signature(build_task).parameters:
        return build_task(name, data_seed, protocol=protocol)
    return build_task(name, data_seed)  # an older dpft: one protocol


def dpft_example(task, spec: dict, example: dict, root: Path):
    """The dpft Example for a fixture's example: from the same file (a MeZO task) or the same k-shot row."""
    if spec["family"] == "lmbff":
        return task._read(SPLITS[example["split"]])[example["index"]]
    path = root / example["file"]
    rows = (task.local_rows(path, example["original"]) if len(inspect.signature(task.local_rows).parameters) > 1
            else task.local_rows(path))
    for ex in map(task.example, rows):
        if ex is not None and ex.uid == example["uid"]:
            return ex
    return None


def causal_rows(scorer, ex, train: bool) -> dict[Any, tuple[list[int], int]]:
    """The rows the model reads for one example, keyed as the reference's (label word, candidate text, or None)."""
    task = scorer.task
    batch = scorer.collate([ex], train=train)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    if task.kind == "generation" and not train:
        return {None: (ids[0][attention[0] == 1].tolist(), 0)}
    if "last" in batch:  # one row scores every (one-token) label word at its last position
        prompt = ids[0][attention[0] == 1].tolist()
        words = batch["words"].tolist() if "words" in batch else scorer._single_token_words()
        return {w: (prompt + [i], 1) for w, i in zip(task.label_words, words)}
    if task.kind == "classification":
        keys = list(task.label_words)
    elif task.kind == "multiple_choice":
        keys = [ex.candidates[ex.label]] if train else list(ex.candidates)
    else:
        keys = [None]
    out = {}
    for row, key in enumerate(keys):
        length = int(attention[row].sum())
        scored = int(batch["predict_mask"][row].sum())
        at = batch["predict_at"][row][: scored].tolist()
        assert at == list(range(length - scored - 1, length - 1)), "scored positions are not the row's last tokens"
        out[key] = (ids[row][:length].tolist(), scored)
    return out


def compare(spec: dict, example: dict, task, scorer, root: Path, ignore_bos: bool = False) -> str | None:
    """None when dpft's rows equal the reference's, else what differs first."""
    ex = dpft_example(task, spec, example, root)
    if ex is None:
        return "dpft does not give this example"
    if spec["family"] == "lmbff":
        if example["ids"] is None:
            return None  # the reference fails on it (its tail cut takes the mask): nothing to match
        batch = scorer.collate([ex], train=False)
        row = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
        if scorer._word_ids() != spec["label_word_ids"]:
            return f"label words {scorer._word_ids()} != {spec['label_word_ids']}"
        if ex.label != example["label"]:
            return f"label {ex.label} != {example['label']}"
        if row != example["ids"]:
            return first_difference(row, example["ids"], scorer.tokenizer)
        if int(batch["mask_pos"][0]) != example["mask_pos"]:
            return f"mask at {int(batch['mask_pos'][0])} != {example['mask_pos']}"
        return None
    if task.kind == "generation":
        golds = example["golds"]
        if set(ex.answers) != set(golds) or ex.answers[0] != golds[0]:
            return f"golds {list(ex.answers)} != {golds}"
    elif task.kind == "classification" and task.label_words[ex.label] != example["gold"]:
        return f"gold {task.label_words[ex.label]!r} != {example['gold']!r}"
    for which, train in (("eval", False), ("train", True)):
        expected = reference_rows(example, which)
        if not expected:
            continue  # the reference cannot train on it (a ReCoRD answer outside the entities)
        got = causal_rows(scorer, ex, train)
        if ignore_bos:
            got = {k: ([0, *ids[1:]], n) for k, (ids, n) in got.items()}
        if set(got) != set(expected):
            return f"{which} candidates {sorted(map(str, got))[:4]} != {sorted(map(str, expected))[:4]}"
        for key, (ids, scored) in expected.items():
            if got[key][0] != ids:
                return f"{which} {key!r}: " + first_difference(got[key][0], ids, scorer.tokenizer)
            if got[key][1] != scored:
                return f"{which} {key!r}: {got[key][1]} tokens scored != {scored}"
    return None


def first_difference(got: list[int], expected: list[int], tokenizer) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return (f"at token {i} of {len(got)} vs {len(expected)}: {tokenizer.decode(got[max(i - 3, 0):i + 4])!r} != "
            f"{tokenizer.decode(expected[max(i - 3, 0):i + 4])!r} (ids {got[i:i + 3]} != {expected[i:i + 3]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixture", type=Path)
    parser.add_argument("--protocol", default="paper", choices=["paper", "dpft"])
    parser.add_argument("--show", type=int, default=0, help="mismatches printed per task")
    parser.add_argument("--tasks", nargs="*", help="only these (the file's names, e.g. mezo/BoolQ lmbff/QQP)")
    parser.add_argument("--ignore-bos", action="store_true", help="compare OPT rows after their first token")
    args = parser.parse_args(argv)
    from dpft.models.loading import load_tokenizer
    from dpft.models.scoring import build_scorer

    root = Path(os.environ["DPFT_DATA_DIR"])
    fixture = json.loads(args.fixture.read_text())
    from omegaconf import OmegaConf

    tokenizers = {family: load_tokenizer(OmegaConf.create({"name": family, "tokenizer_mirror": f"tokenizers/{name}"}))
                  for family, name in (("mezo", "opt"), ("lmbff", "roberta-base"))}
    total = [0, 0]
    for key, spec in fixture["tasks"].items():
        if args.tasks and key not in args.tasks:
            continue
        task = build(dpft_name(key), args.protocol, 42 if spec["family"] == "lmbff" else None)
        kind = "causal_lm" if spec["family"] == "mezo" else "masked_lm"
        scorer = build_scorer(kind, task, tokenizers[spec["family"]], spec["max_length"],
                              spec.get("max_new_tokens", 50))
        misses = []
        for example in spec["examples"]:
            try:
                why = compare(spec, example, task, scorer, root, args.ignore_bos)
            except Exception as err:  # noqa: BLE001  (an older dpft may fail on an example: that is a miss)
                why = f"{type(err).__name__}: {err}"
            if why is not None:
                misses.append((example.get("uid", example.get("index")), example.get("original", example.get("split")),
                               why))
        n = len(spec["examples"])
        total[0] += n - len(misses)
        total[1] += n
        print(f"{key:18s} {dpft_name(key):10s} {n - len(misses):5d} of {n:5d} match")
        for uid, split, why in misses[: args.show]:
            print(f"    {split} {uid}: {why}")
    print(f"{'all':29s} {total[0]:5d} of {total[1]:5d} match")
    return 0 if total[0] == total[1] else 1


if __name__ == "__main__":
    sys.exit(main())
