"""The token ids the papers' reference code feeds its models, for real examples of the data mirror: the facts
`tests/test_protocols.py` holds dpft's `task.protocol=paper` to (tests/data/reference_tokens.json).

Nothing here is dpft's: the rows come from the mirror's files through the Hugging Face builder scripts the reference
code loaded (`super_glue`, `boolq`, `glue`, `squad`, `drop`, imported from a huggingface/datasets checkout), and the
token ids from the reference code itself, imported from its checkouts:

- OPT (MeZO; DPZero's `opt/` is the same code): `large_models/{templates,tasks,utils}.py` of princeton-nlp/MeZO.
  `tasks.py`'s `*Dataset.build_sample` and `get_template`, `utils.encode_prompt` (prompt, candidates, the scored
  span and truncation), the tokenizer as `run.py` loads it (`use_fast=False`, `bos_token_id = 0` for OPT), and the
  training row `run.py`'s `Framework.train` picks (`--train_as_classification` except Copa, ReCoRD, SQuAD, DROP:
  `mezo.sh`), at MeZO's `--max_length 2048` and `--max_new_tokens 50`.
- RoBERTa (LM-BFF; DPZero's `roberta/`, MeZO's `medium_models/`): `src/processors.py` reads the k-shot files,
  `src/dataset.py`'s `tokenize_multipart_input` renders them, with each task's template, label words and
  `TASK_EXTRA` (`--max_seq_len`, `--first_sent_limit`, ...) parsed from `examples/run_fewshot.sh` as HfArgumentParser
  reads them (`--max_seq_len 256` abbreviates, and overrides, `--max_seq_length 128`).

Run it in the reference's environment: MeZO and DPZero pin transformers 4.28.1 and tokenizers 0.13.3 (under
transformers 5 a tokenizer's `bos_token_id` no longer changes what `encode` prepends, so MeZO's BOS would be lost):

    pip install --target /tmp/tf428 transformers==4.28.1 tokenizers==0.13.3 huggingface_hub==0.16.4
    git clone https://github.com/princeton-nlp/MeZO /tmp/MeZO                       # at 552cb1b
    git clone https://github.com/Liang137/DPZero /tmp/DPZero                        # at 485f236
    git clone https://github.com/huggingface/datasets /tmp/hf-datasets              # the last commit with the
    git -C /tmp/hf-datasets checkout d7dfbc83d68e87ba002c5eb2555f7a932e59038a       # builder scripts in datasets/
    PYTHONPATH=/tmp/tf428 .venv/bin/python tools/reference_tokens.py --data ../shared/data \\
        --mezo /tmp/MeZO/large_models --lmbff /tmp/DPZero/roberta --hf-datasets /tmp/hf-datasets \\
        --out tests/data/reference_tokens.json

`--all` writes every example read instead of a handful per task (a large file, for
`tools/compare_reference_tokens.py`): all of each validation and k-shot file, the first 2000 of each MeZO train file. The ReCoRD candidates' order is not a fact of the reference (HF's builder
gives them as a Python set, whose order varies with the process's hash seed): candidates are keyed by their text.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

# the k-shot folders of the mirror, by LM-BFF task name (run_fewshot.sh's TASK and processors_mapping's key)
KSHOT = {"SST-2": ("sst-2", "SST-2", "sst2"), "sst-5": ("sst-5", "SST-5", "sst5"), "QQP": ("qqp", "QQP", "qqp"),
         "QNLI": ("qnli", "QNLI", "qnli"), "MNLI": ("mnli", "MNLI", "mnli"), "SNLI": ("snli", "SNLI", "snli"),
         "trec": ("trec", "TREC", "trec"), "RTE": ("rte", "RTE", "rte")}
KSHOT_SPLIT = "512-42"  # the paper tables' k and first data seed (the test files are the same for every seed)
MEZO_MAX_LENGTH, MEZO_MAX_NEW_TOKENS = 2048, 50  # run.py's defaults; mezo.sh and dpzero.sh keep them
# MeZO's left cut, shown at shorter lengths than any mirror example reaches at 2048: the first examples whose cut
# takes only their first field's text (a cut into the template is where dpft parts from the reference on purpose)
SHORT = {"BoolQ": (128, "passage"), "MultiRC": (128, "paragraph"), "ReCoRD": (256, "passage"), "RTE": (48, "premise"),
         "SST2": (12, "sentence")}
SHORT_EXAMPLES = 3
FIRST = 2  # the first examples of every file kept
PER_FLAG = {"span_fixed": 8, "gold_not_first_listed": 7, "cited": 10}  # examples kept per notable property (default 4)
CITED = {"QNLI": {("test", 31)}}  # rows issue 32 names (k-shot rows by file and position)


# --- the Hugging Face builders ----------------------------------------------------------------------
def stand_in_datasets() -> None:
    """The builder scripts and MeZO's tasks.py import `datasets` for declarations only (features, versions,
    `load_dataset` they never reach here): a stand-in lets `_generate_examples` run without the library."""

    class Anything:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)

        def __call__(self, *args: Any, **kwargs: Any) -> Anything:
            return Anything()

        def __getattr__(self, name: str) -> Anything:
            return Anything()

    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    module.BuilderConfig = Anything
    module.GeneratorBasedBuilder = type("GeneratorBasedBuilder", (), {})
    module.__getattr__ = lambda name: Anything()  # type: ignore[method-assign]
    sys.modules["datasets"] = module
    sys.modules["datasets.tasks"] = module


def load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def builder(script: Path, cls: str, config: str | None = None) -> Any:
    module = load(f"hf_{script.stem}", script)
    obj = object.__new__(getattr(module, cls))
    if config is not None:
        obj.config = next(c for c in obj.BUILDER_CONFIGS if c.name == config)
    return obj


def hf_rows(obj: Any, **kwargs: Any) -> list[dict]:
    """A builder's rows as `load_dataset` returns them (string labels through the ClassLabel to indices)."""
    rows = []
    for _, row in obj._generate_examples(**kwargs):
        classes = getattr(getattr(obj, "config", None), "label_classes", None)
        if isinstance(row.get("label"), str) and classes:
            row["label"] = list(classes).index(row["label"])
        # ReCoRD's entities are a Python set, stored as a list in whatever order the set iterates (it varies with
        # the process's hash seed): sorted here, so that reruns write the same file (candidates are keyed by text)
        row.update({k: sorted(v) for k, v in row.items() if isinstance(v, set)})
        rows.append(row)
    return rows


def boolq_original(superglue_file: Path, out: Path) -> Path:
    """SuperGLUE's BoolQ rows in the original BoolQ format HF's `boolq` builder reads: SuperGLUE's passage is the
    original's `title -- passage`, its label the original's `answer`."""
    with open(superglue_file, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            row = json.loads(line)
            title, passage = row["passage"].split(" -- ", 1)
            g.write(json.dumps({"question": row["question"], "title": title, "answer": row["label"],
                                "passage": passage}) + "\n")
    return out


def drop_validated(drop_file: Path, out: Path) -> Path:
    """The questions of a DROP-format file that carry validated answers (HF's validation split reads them)."""
    data = json.loads(drop_file.read_text(encoding="utf-8"))
    kept = {pid: {**section, "qa_pairs": [qa for qa in section["qa_pairs"] if qa.get("validated_answers")]}
            for pid, section in data.items()}
    out.write_text(json.dumps({pid: s for pid, s in kept.items() if s["qa_pairs"]}), encoding="utf-8")
    return out


# --- MeZO (OPT) -------------------------------------------------------------------------------------
def mezo_sources(data: Path, hf: Path, tmp: Path) -> dict[str, list[tuple[str, str, list[dict], list[dict]]]]:
    """Per task: (mirror file, HF split, HF rows, the file's own rows) for every mirror file the task can read."""
    sg = hf / "datasets/super_glue/super_glue.py"
    out: dict[str, list] = {}
    for task, config, folder in [("RTE", "rte", "RTE"), ("CB", "cb", "CB"), ("Copa", "copa", "COPA"),
                                 ("WIC", "wic", "WiC"), ("WSC", "wsc.fixed", "WSC"), ("MultiRC", "multirc", "MultiRC")]:
        out[task] = [(f"{folder}/{name}.jsonl", split, hf_rows(builder(sg, "SuperGlue", config),
                                                                 data_file=str(data / folder / f"{name}.jsonl"),
                                                                 split=split), raw_jsonl(data / folder / f"{name}.jsonl"))
                     for name, split in (("train", "train"), ("val", "validation"))]
    out["ReCoRD"] = [(f"ReCoRD/fewglue_32dev/{name}.jsonl", split,
                      hf_rows(builder(sg, "SuperGlue", "record"), data_file=str(data / f"ReCoRD/fewglue_32dev/{name}.jsonl"),
                              split=split), raw_jsonl(data / f"ReCoRD/fewglue_32dev/{name}.jsonl"))
                     for name, split in (("train", "train"), ("dev32", "validation"))]
    boolq = builder(hf / "datasets/boolq/boolq.py", "Boolq")
    out["BoolQ"] = [(rel, split, hf_rows(boolq, filepath=str(boolq_original(data / rel, tmp / f"boolq-{split}.jsonl"))),
                     raw_jsonl(data / rel))
                    for rel, split in (("BoolQ/fewglue_32dev/train.jsonl", "train"), ("BoolQ/val.jsonl", "validation"))]
    glue = builder(hf / "datasets/glue/glue.py", "Glue", "sst2")
    out["SST2"] = [(rel, split, hf_rows(glue, data_file=str(data / rel), split=split), [])
                   for rel, split in (("SST-2/train.tsv", "train"), ("SST-2/dev.tsv", "validation"))]
    squad = builder(hf / "datasets/squad/squad.py", "Squad")
    out["SQuAD"] = [(rel, split, hf_rows(squad, filepath=str(data / rel)), [])
                    for rel, split in (("SQuAD/train-v1.1.reconstructed.json", "train"),
                                       ("SQuAD/dev-v1.1.reconstructed.json", "validation"))]
    # the mirror has no DROP split: its 300 train questions read as train, the contrast set's questions that carry
    # validated answers as validation (what matters is the builder's rule for each split's golds)
    drop = builder(hf / "datasets/drop/drop.py", "Drop")
    train, contrast = ("DROP/succesive_prompting_train300/drop_dataset_train_300_annotations.json",
                       "DROP/contrast_sets/drop_contrast_sets_test.json")
    out["DROP"] = [(train, "train", hf_rows(drop, filepath=str(data / train), split="train"), []),
                   (contrast, "validation", hf_rows(drop, filepath=str(drop_validated(data / contrast, tmp / "val.json")),
                                                    split="validation"), [])]
    return out


def raw_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mezo_uid(task: str, row: dict) -> str:
    idx = row.get("idx")
    if task == "MultiRC":
        return f"{idx['paragraph']}-{idx['question']}-{idx['answer']}"
    if task == "ReCoRD":
        return str(idx["query"])
    if task == "SQuAD":
        return row["id"]
    if task == "DROP":
        return row["query_id"]
    return str(idx)


def mezo_examples(mezo: types.ModuleType, utils: types.ModuleType, tokenizer: Any, task: str, rows: list[dict],
                  raw: list[dict], source: tuple[str, str], keep_all: bool,
                  max_length: int = MEZO_MAX_LENGTH, first_field: str | None = None) -> list[dict]:
    dataset = object.__new__(getattr(mezo, f"{task}Dataset"))
    template = dataset.get_template()
    generation = dataset.generation
    by_idx = {r["idx"]: r for r in raw} if task in ("WSC", "ReCoRD") else {}  # the file's own rows, by (passage) idx
    found: list[tuple[set[str], dict]] = []
    for i, row in enumerate(rows):
        sample = dataset.build_sample(row, i) if generation else dataset.build_sample(row)
        ev, ev_lens = utils.encode_prompt(dataset, template, [], sample, tokenizer, max_length=max_length,
                                          generation=generation, max_new_tokens=MEZO_MAX_NEW_TOKENS)
        tr, tr_lens = utils.encode_prompt(dataset, template, [], sample, tokenizer, max_length=max_length,
                                          generation=generation, generation_with_gold=True,
                                          max_new_tokens=MEZO_MAX_NEW_TOKENS)
        keys = [None] if generation else [key_of(template, c) for c in sample.candidates]
        gold: Any = None
        try:  # run.py, Framework.train's _convert: the gold row (the first listed answer for ReCoRD)
            correct = sample.correct_candidate
            gold_index = 0 if generation else sample.candidates.index(correct[0] if isinstance(correct, list) else correct)
            gold = keys[gold_index]
        except ValueError:  # a ReCoRD answer that is not among the entities: the reference cannot train on it
            gold_index = None
        as_classification = not generation and task not in ("Copa", "ReCoRD")  # mezo.sh
        train = ([] if gold_index is None else
                 [{"key": gold, "ids": tr[gold_index], "scored": tr_lens[gold_index]}] if not as_classification else
                 [{"key": k, "ids": ids, "scored": n} for k, ids, n in zip(keys, tr, tr_lens)])
        uid = str(raw[i]["idx"]) if task == "BoolQ" else mezo_uid(task, row)  # HF's boolq rows have no idx
        example = {"file": source[0], "original": source[1], "uid": uid,
                   "eval": [{"key": k, "ids": ids, "scored": n} for k, ids, n in zip(keys, ev, ev_lens)],
                   "train": train, "gold": gold,
                   "golds": list(sample.correct_candidate) if generation else None}
        idx = row.get("idx")
        own = by_idx.get(idx["passage"] if task == "ReCoRD" else idx) if by_idx else None
        flags = mezo_flags(task, template, sample, tokenizer, row, own)
        if first_field is not None:  # every row cut, and only inside the field the prompt starts with
            texts = ([template.encode(sample)] if generation else
                     [template.verbalize(sample, c) for c in sample.candidates])
            example["text_only_cut"] = all(
                cuts_only_the_start(tokenizer, text, row[first_field], ids)
                for text, ids in zip(texts, [r["ids"] for r in example["eval"]]))
        found.append((flags, example))
    return [e for _, e in found] if keep_all else select(found)


def cuts_only_the_start(tokenizer: Any, verbalized: str, field: str, ids: list[int]) -> bool:
    """Whether a row (BOS + the tokens kept) lost tokens from the start of its text, all within `field`, the text
    the prompt starts with (encode_prompt's final string: stripped of spaces, then of leading whitespace)."""
    full = verbalized.strip(" ").lstrip()
    kept = tokenizer.decode(ids[1:], clean_up_tokenization_spaces=False)  # whole BPE tokens: the exact text
    lost = len(full) - len(kept)
    start = full.find(field.replace("@highlight\n", "- ").strip()[:20])
    return full.endswith(kept) and start == 0 and 0 < lost <= len(field.replace("@highlight\n", "- ").strip())


def key_of(template: Any, candidate: Any) -> str:
    """A classification candidate by its label word (BoolQ's candidates are the words), a choice by its text."""
    verbalizer = getattr(template, "verbalizer", None)
    return verbalizer[candidate] if verbalizer and not isinstance(candidate, str) else candidate


def mezo_flags(task: str, template: Any, sample: Any, tokenizer: Any, row: dict, raw: dict | None) -> set[str]:
    """What makes an example worth keeping: a cut at 2048, leading whitespace MeZO strips, a candidate whose tokens
    merge with the prompt's, WSC's span fix, ReCoRD's and SQuAD's several answers, DROP's golds per split."""
    flags = set()
    encoded = template.encode(sample)
    if encoded != encoded.lstrip():
        flags.add("leading_space")
    if len(tokenizer.encode(encoded)) > MEZO_MAX_LENGTH - MEZO_MAX_NEW_TOKENS:
        flags.add("truncated")
    if not getattr(sample, "candidates", None):
        return flags | ({"several_answers"} if len(set(sample.correct_candidate)) > 1 else set())
    plain = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt = encoded.strip(" ")
    for c in sample.candidates:
        verbalized = template.verbalize(sample, c).strip(" ")
        if plain(verbalized) != plain(prompt) + plain(verbalized[len(prompt):]):
            flags.add("boundary_merge")
    if task == "WSC" and raw is not None and (raw["target"]["span1_text"], raw["target"]["span2_text"]) != (
            row["span1_text"], row["span2_text"]):
        flags.add("span_fixed")
    if task == "ReCoRD" and raw is not None:
        qa = next(q for q in raw["qas"] if q["idx"] == row["idx"]["query"])
        if len({a["text"] for a in qa.get("answers", [])}) > 1 and qa["answers"][0]["text"] != row["answers"][0]:
            flags.add("gold_not_first_listed")
    return flags


# --- LM-BFF (RoBERTa) -------------------------------------------------------------------------------
def lmbff_settings(script: Path) -> dict[str, dict[str, Any]]:
    """Per task: template, mapping and the arguments run_fewshot.sh passes (TASK_EXTRA after the common ones)."""
    text = script.read_text()
    base = re.search(r"--max_seq_length (\d+)", text).group(1)
    parser = argparse.ArgumentParser(allow_abbrev=True)  # as HfArgumentParser: an unambiguous prefix is the option
    parser.add_argument("--max_seq_length", type=int)
    parser.add_argument("--first_sent_limit", type=int)
    parser.add_argument("--other_sent_limit", type=int)
    parser.add_argument("--num_sample", type=int)
    parser.add_argument("--double_demo", action="store_true")
    out = {}
    for m in re.finditer(r"^\s*([\w-]+)\)\s*\n\s*TEMPLATE=(\S+)\s*\n\s*MAPPING=\"([^\"]+)\"(?:\s*\n\s*TASK_EXTRA=\"([^\"]*)\")?",
                         text, re.M):
        task, template, mapping, extra = m.groups()
        if task in KSHOT:
            args = parser.parse_args(["--max_seq_length", base, *(extra or "").split()])
            out[task] = {"template": template.strip('"'), "mapping": mapping, "max_length": args.max_seq_length,
                         "first_sent_limit": args.first_sent_limit, "other_sent_limit": args.other_sent_limit,
                         "task_extra": extra or ""}
    return out


def lmbff_task(dataset: types.ModuleType, processors: types.ModuleType, tokenizer: Any, name: str,
               settings: dict[str, Any], folder: Path, keep_all: bool) -> dict[str, Any]:
    key, _, _ = KSHOT[name]
    processor = processors.processors_mapping[key]
    labels = processor.get_labels()
    words = eval(settings["mapping"])  # noqa: S307  (run.py evaluates --mapping the same way)
    for label, word in words.items():  # dataset.py, FewShotDataset.__init__
        assert word[0] not in "<[.," and len(tokenizer.tokenize(" " + word)) == 1
        words[label] = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + word)[0])
    word_ids = [words[label] for label in labels]

    def render(example: Any, max_length: int, first: int | None, other: int | None) -> dict:
        return dataset.tokenize_multipart_input(
            input_text_list=dataset.input_example_to_tuple(example), max_length=max_length, tokenizer=tokenizer,
            task_name=key, prompt=True, template=settings["template"], label_word_list=word_ids,
            first_sent_limit=first, other_sent_limit=other)

    found = []
    for split, read in (("train", processor.get_train_examples), ("dev", processor.get_dev_examples),
                        ("test", processor.get_test_examples)):
        for i, example in enumerate(read(str(folder))):
            entry: dict[str, Any] = {"split": split, "index": i, "label": labels.index(example.label)}
            flags = set()
            try:
                out = render(example, settings["max_length"], settings["first_sent_limit"], settings["other_sent_limit"])
                entry.update(ids=out["input_ids"], mask_pos=out["mask_pos"][0])
            except AssertionError:  # the tail cut took the mask: the reference stops
                entry.update(ids=None, mask_pos=None)
                flags.add("mask_cut")
            full = render(example, 10**6, None, None)["input_ids"]
            limited = render(example, 10**6, settings["first_sent_limit"], settings["other_sent_limit"])["input_ids"]
            if len(limited) > settings["max_length"]:
                flags.add("tail_cut")
            if limited != full:
                flags.add("sentence_limit")
            if (split, i) in CITED.get(name, ()):
                flags.add("cited")
            texts = [t for t in (example.text_a, example.text_b) if isinstance(t, str)]
            if any(t != t.strip() for t in texts):
                flags.add("outer_space")
            found.append((flags, entry))
    return {"family": "lmbff", "folder": f"{KSHOT[name][1]}/k-shot-1k-test/{KSHOT_SPLIT}", "template": settings["template"],
            "task_extra": settings["task_extra"], "max_length": settings["max_length"],
            "first_sent_limit": settings["first_sent_limit"], "other_sent_limit": settings["other_sent_limit"],
            "label_word_ids": word_ids, "examples": [e for _, e in found] if keep_all else select(found, "split")}


# --- selection and output ---------------------------------------------------------------------------
def select(found: list[tuple[set[str], dict]], group: str = "original") -> list[dict]:
    """The first FIRST examples of every file (and split), then up to PER_FLAG more for each notable property."""
    kept: dict[int, tuple[list[str], dict]] = {}
    seen: dict[Any, int] = {}
    for i, (_, ex) in enumerate(found):
        where = (ex.get("file"), ex[group])
        seen[where] = seen.get(where, 0) + 1
        if seen[where] <= FIRST:
            kept[i] = (["first"], ex)
    for flag in sorted({f for flags, _ in found for f in flags}):
        hits = [i for i, (flags, _) in enumerate(found) if flag in flags][:PER_FLAG.get(flag, 4)]
        for i in hits:
            kept.setdefault(i, ([], found[i][1]))[0].append(flag)
    return [{**ex, "why": why} for _, (why, ex) in sorted(kept.items())]


def compact(example: dict) -> dict:
    """Rows as their common prefix once and each row's rest: a ReCoRD example repeats its passage per candidate."""
    rows = [r for r in example.get("eval", []) + example.get("train", []) if r["ids"] is not None]
    if not rows:
        return example
    prefix = rows[0]["ids"]
    for r in rows[1:]:
        n = next((i for i, (a, b) in enumerate(zip(prefix, r["ids"])) if a != b), min(len(prefix), len(r["ids"])))
        prefix = prefix[:n]
    strip = lambda rs: [{**{k: v for k, v in r.items() if k != "ids"}, "rest": r["ids"][len(prefix):]} for r in rs]  # noqa: E731
    return {**example, "prefix": prefix, "eval": strip(example["eval"]), "train": strip(example["train"])}


def commit_of(path: Path) -> str:
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the data mirror (../shared/data)")
    parser.add_argument("--mezo", type=Path, required=True, help="MeZO's large_models/ (templates.py, tasks.py, utils.py)")
    parser.add_argument("--lmbff", type=Path, required=True, help="a folder with LM-BFF's src/ and examples/run_fewshot.sh")
    parser.add_argument("--hf-datasets", type=Path, required=True, help="huggingface/datasets at d7dfbc83d6")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--all", action="store_true", help="every example, not a handful per task")
    args = parser.parse_args(argv)

    import transformers

    if not transformers.__version__.startswith("4."):
        sys.exit(f"transformers {transformers.__version__}: run with the reference's 4.28.1 (see this file's docstring)")
    from transformers import AutoTokenizer

    sys.path[:0] = [str(args.mezo.resolve()), str(args.lmbff.resolve())]
    import utils  # MeZO's

    stand_in_datasets()
    import tasks as mezo  # MeZO's
    from src import dataset, processors  # LM-BFF's

    opt = AutoTokenizer.from_pretrained(str(args.data / "tokenizers/opt"), use_fast=False)  # run.py
    opt.bos_token_id = 0  # run.py: "HF tokenizer bug fix" for OPT
    assert opt.encode("a")[0] == 0
    roberta = AutoTokenizer.from_pretrained(str(args.data / "tokenizers/roberta-base"))
    roberta.model_type = "roberta"  # run.py sets it from the model config

    out: dict[str, Any] = {
        "command": "PYTHONPATH=/tmp/tf428 python tools/reference_tokens.py --data ../shared/data --mezo "
                   "/tmp/MeZO/large_models --lmbff /tmp/DPZero/roberta --hf-datasets /tmp/hf-datasets --out "
                   "tests/data/reference_tokens.json" + (" --all" if args.all else ""),
        "references": {"mezo": f"princeton-nlp/MeZO@{commit_of(args.mezo)} large_models",
                       "lmbff": f"Liang137/DPZero@{commit_of(args.lmbff)} roberta (LM-BFF)",
                       "hf_datasets": f"huggingface/datasets@{commit_of(args.hf_datasets)}"},
        "transformers": transformers.__version__, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sources = mezo_sources(args.data, args.hf_datasets, Path(tmp))
    for task, files in sources.items():
        examples = []
        for rel, split, rows, raw in files:
            if split == "train":  # the first 2000 of a train file (of 67k SST-2, 87k SQuAD, 27k MultiRC)
                rows = rows[:2000]
            examples += mezo_examples(mezo, utils, opt, task, rows, raw, (rel, split), args.all)
        out["tasks"][f"mezo/{task}"] = {"family": "mezo", "max_length": MEZO_MAX_LENGTH, "max_new_tokens": MEZO_MAX_NEW_TOKENS,
                              "examples": [compact(e) for e in examples]}
        print(task, len(examples), file=sys.stderr)
    for task, (length, field) in SHORT.items():
        rel, split, rows, raw = next(f for f in sources[task] if f[1] == "validation")
        found = mezo_examples(mezo, utils, opt, task, rows[:40], raw, (rel, split), True, length, field)
        cut = [e for e in found if e.pop("text_only_cut")][:SHORT_EXAMPLES]
        out["tasks"][f"mezo/{task}@{length}"] = {"family": "mezo", "max_length": length,
                                                 "max_new_tokens": MEZO_MAX_NEW_TOKENS,
                                                 "examples": [compact({**e, "why": ["left_cut"]}) for e in cut]}
        print(f"{task}@{length}", len(cut), file=sys.stderr)
    script = args.lmbff / "examples/run_fewshot.sh"
    for name, settings in lmbff_settings(script if script.is_file() else args.lmbff / "run_fewshot.sh").items():
        folder = args.data / KSHOT[name][1] / "k-shot-1k-test" / KSHOT_SPLIT
        out["tasks"][f"lmbff/{name}"] = lmbff_task(dataset, processors, roberta, name, settings, folder, args.all)
        print(name, len(out["tasks"][f"lmbff/{name}"]["examples"]), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:  # one example per line: a diff shows which example changed
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in out.items() if k != "tasks"))
        f.write(',\n"tasks": {\n')
        f.write(",\n".join(
            f"{json.dumps(name)}: {{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in t.items() if k != "examples")
            + ', "examples": [\n' + ",\n".join(json.dumps(e, separators=(",", ":")) for e in t["examples"]) + "]}"
            for name, t in out["tasks"].items()))
        f.write("}}\n")


if __name__ == "__main__":
    main()
