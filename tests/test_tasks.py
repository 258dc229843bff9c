"""Tasks read the real mirror in place (../shared/data): published sizes, the split protocols,
templates on known rows, and the errors users see when data is missing."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from dpft.data.tasks import DATA_ENV, TASKS, Example, MissingDataError, build_task


def _find_data() -> Path | None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared.is_dir():
        return shared
    env = os.environ.get(DATA_ENV)
    return Path(env) if env and Path(env).is_dir() else None


DATA = _find_data()
MEZO = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop"]
KSHOT = [f"{t}-k{k}" for t in ("sst2", "sst5", "snli", "mnli", "rte", "trec", "qnli", "qqp") for k in (16, 512)]


@pytest.fixture(scope="module")
def data_root():
    """Point DPFT_DATA_DIR at the real mirror for the whole module (skip where there is none)."""
    if DATA is None:
        pytest.skip(f"no data mirror: neither ../shared/data next to the repo nor ${DATA_ENV} exists")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DATA_ENV, str(DATA))
        yield DATA


def uids(examples: list[Example]) -> list[str]:
    return [ex.uid for ex in examples]


# --- registry ------------------------------------------------------------------------------------
def test_registry_holds_every_task_and_family_defaults():
    assert set(TASKS) == set(MEZO) | set(KSHOT)
    assert build_task("rte").data_seed == 0
    assert build_task("rte-k16").data_seed == 42
    assert build_task("rte-k16", 13).data_seed == 13
    assert build_task("squad").kind == "generation" and build_task("squad").metric == "f1"
    assert build_task("copa").kind == "multiple_choice" and build_task("record").kind == "multiple_choice"
    assert {build_task(n).kind for n in ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", *KSHOT]} == {
        "classification"}


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'sst-2'") as err:
        build_task("sst-2")
    assert all(name in str(err.value) for name in ["sst2", "squad", "trec-k512"])


def test_unknown_kshot_seed_and_unknown_option_are_errors():
    with pytest.raises(ValueError, match=r"13, 21, 42, 87, 100"):
        build_task("sst2-k512", data_seed=0)
    with pytest.raises(ValueError, match="num_trian"):
        build_task("rte", num_trian=10)


# --- k-shot (LM-BFF) -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,train,val,test", [
    ("sst2-k512", 1024, 1024, 872), ("sst2-k16", 32, 32, 872),
    ("sst5-k512", 2560, 2560, 1000),  # the k-shot test file is capped at 1000 (full test: below)
    ("mnli-k512", 1536, 1536, 1000), ("snli-k512", 1536, 1536, 1000), ("snli-k16", 48, 48, 1000),
    ("rte-k512", 1024, 1024, 277), ("qnli-k512", 1024, 1024, 1000), ("qqp-k512", 1024, 1024, 1000),
    ("trec-k512", 2646, 2243, 500), ("trec-k16", 96, 96, 500),
])
def test_kshot_sizes(data_root, name, train, val, test):
    splits = build_task(name).splits()
    assert {s: len(v) for s, v in splits.items()} == {"train": train, "val": val, "test": test}


def test_kshot_balance_and_label_range(data_root):
    for name in KSHOT:
        task = build_task(name, data_seed=87)
        splits = task.splits()
        for split, examples in splits.items():
            assert {ex.label for ex in examples} <= set(range(task.num_labels)), (name, split)
        if name.startswith("trec-k512"):
            continue  # TREC has only 86 "Expression" (ABBR) training questions: cannot hold 512 per class
        k = int(name.split("-k")[1])
        for split in ("train", "val"):
            assert Counter(ex.label for ex in splits[split]) == {y: k for y in range(task.num_labels)}, (name, split)
    # ... which is what the TREC files show (dev has no Expression question left at all)
    trec = build_task("trec-k512").splits(("train", "val"))
    assert Counter(ex.label for ex in trec["train"]) == {0: 512, 1: 512, 2: 86, 3: 512, 4: 512, 5: 512}
    assert 2 not in {ex.label for ex in trec["val"]}


def test_kshot_seeds_differ_and_test_is_shared(data_root):
    a, b = build_task("sst2-k16", 13).splits(), build_task("sst2-k16", 21).splits()
    assert [e.fields for e in a["train"]] != [e.fields for e in b["train"]]
    assert [e.fields for e in a["test"]] == [e.fields for e in b["test"]]


def test_sst5_full_test_has_2210_sentences(data_root):
    test = build_task("sst5-k512", full_test=True).splits(("test",))["test"]
    assert len(test) == 2210
    assert test[0].fields == {"sentence": "no movement , no yuks , not much of anything ."} and test[0].label == 1
    with pytest.raises(MissingDataError, match="MNLI/dev_matched.tsv"):  # GLUE MNLI dev is not mirrored
        build_task("mnli-k512", full_test=True).splits(("test",))


@pytest.mark.parametrize("name,fields,label,masked,prompt,conts", [
    ("sst2-k16", {"sentence": "with outtakes in which most of the characters forget their lines and just utter ` uhhh "
                              ", ' which is better than most of the writing in the movie"}, 0,
     ("with outtakes in which most of the characters forget their lines and just utter ` uhhh , ' which is better "
      "than most of the writing in the movie It was", "."), None, [" terrible", " great"]),
    ("sst5-k16", {"sentence": "more of the same from taiwanese auteur tsai ming-liang , which is good news to anyone "
                              "who 's fallen under the sweet , melancholy spell of this unique director 's previous "
                              "films ."}, 3, None, None, [" terrible", " bad", " okay", " good", " great"]),
    ("mnli-k16", {"sentence1": "That's all right.", "sentence2": "That's fine."}, 1,
     ("That's all right?", ", that's fine."),
     "Suppose That's all right. Can we infer that \"That's fine.\"? Yes, No, or Maybe?\n", ["No", "Yes", "Maybe"]),
    ("snli-k16", {"sentence1": "A group of young boys in blue swimming suits attempt to jump into a pool to their "
                               "swimming instructors.", "sentence2": "The boys are playing in the grass."}, 0,
     ("A group of young boys in blue swimming suits attempt to jump into a pool to their swimming instructors?",
      ", the boys are playing in the grass."),
     "Suppose A group of young boys in blue swimming suits attempt to jump into a pool to their swimming "
     "instructors. Can we infer that \"The boys are playing in the grass.\"? Yes, No, or Maybe?\n", ["No", "Yes", "Maybe"]),
    ("rte-k16", {"sentence1": "In 2003, Yunus brought the microcredit revolution to the streets of Bangladesh to "
                              "support more than 50,000 beggars, whom the Grameen Bank respectfully calls Struggling "
                              "Members.", "sentence2": "Yunus supported more than 50,000 Struggling Members."}, 0,
     ("In 2003, Yunus brought the microcredit revolution to the streets of Bangladesh to support more than 50,000 "
      "beggars, whom the Grameen Bank respectfully calls Struggling Members?",
      ", yunus supported more than 50,000 Struggling Members."),
     "In 2003, Yunus brought the microcredit revolution to the streets of Bangladesh to support more than 50,000 "
     "beggars, whom the Grameen Bank respectfully calls Struggling Members.\nDoes this mean that \"Yunus supported "
     "more than 50,000 Struggling Members.\" is true? Yes or No?\n", ["Yes", "No"]),
    ("qnli-k16", {"sentence1": "In what year did Robert Louis Stevenson die?",
                  "sentence2": "Mission work in Samoa had begun in late 1830 by John Williams, of the London "
                               "Missionary Society arriving in Sapapali'i from The Cook Islands and Tahiti."}, 1,
     ("In what year did Robert Louis Stevenson die?", ", mission work in Samoa had begun in late 1830 by John "
      "Williams, of the London Missionary Society arriving in Sapapali'i from The Cook Islands and Tahiti."),
     "Question: In what year did Robert Louis Stevenson die?\nSentence: Mission work in Samoa had begun in late "
     "1830 by John Williams, of the London Missionary Society arriving in Sapapali'i from The Cook Islands and "
     "Tahiti.\nDoes the sentence answer the question? Yes or No?\n", ["Yes", "No"]),
    ("qqp-k16", {"sentence1": "Why do some people think that having a baby is a blessing?",
                 "sentence2": "Why is having a baby a blessing?"}, 1,
     ("Why do some people think that having a baby is a blessing?", ", why is having a baby a blessing?"),
     "Question 1: Why do some people think that having a baby is a blessing?\nQuestion 2: Why is having a baby a "
     "blessing?\nDo both questions ask the same thing? Yes or No?\n", ["No", "Yes"]),
    ("trec-k16", {"sentence": "What city is served by Tempelhol Airport ?"}, 4,
     ("", ": What city is served by Tempelhol Airport ?"), "What city is served by Tempelhol Airport ? Answer type:",
     [" Description", " Entity", " Expression", " Human", " Location", " Number"]),
])
def test_kshot_first_train_row_renders(data_root, name, fields, label, masked, prompt, conts):
    task = build_task(name)
    ex = task.splits(("train",))["train"][0]
    assert ex.fields == fields and ex.label == label
    left, right = task.masked_prompt(ex)
    if masked is not None:
        assert (left, right) == masked
    assert task.causal_prompt(ex) == (left if prompt is None else prompt)
    assert task.causal_continuations(ex) == conts
    assert [c.strip() for c in conts] == list(task.label_words)
    assert task.text_pair(ex) == tuple(fields.values()) + ((None,) if len(fields) == 1 else ())


# --- MeZO / OPT protocol -------------------------------------------------------------------------
@pytest.mark.parametrize("name,train,val,test", [
    ("sst2", 1000, 500, 872), ("rte", 1000, 500, 277), ("cb", 150, 100, 56), ("copa", 300, 100, 100),
    ("wic", 1000, 500, 638), ("multirc", 1000, 500, 1000),
    ("wsc", 54, 500, 104),  # 554 train rows: MeZO's 500 dev leave 54 for training
])
def test_protocol_sizes(data_root, name, train, val, test):
    splits = build_task(name).splits()
    assert {s: len(v) for s, v in splits.items()} == {"train": train, "val": val, "test": test}


@pytest.mark.parametrize("name,options", [(n, {}) for n in MEZO] + [
    ("sst2", {"num_train": 64}), ("cb", {"num_dev": 200}), ("copa", {"num_train": 10_000}),
    ("rte", {"num_dev": 2_000})])
def test_train_size_before_loading_is_the_loaded_size(data_root, name, options):
    """`train_size()` of the MeZO protocol (what a run checks its batch size against before anything loads)
    is the number of training examples the split then gives. (A k-shot task counts its train file's rows.)"""
    task = build_task(name, **options)
    expected = task.train_size()
    try:
        loaded = task.splits(("train",))["train"]
    except MissingDataError:
        pytest.skip(f"{name}: the mirror has no train file (train_size comes from the published size)")
    assert len(loaded) == expected


def test_original_split_sizes(data_root):
    assert len(build_task("rte").load_original("validation")) == 277
    assert len(build_task("sst2").load_original("train")) == 67349
    assert len(build_task("multirc").load_original("validation")) == 4848  # answer options, not passages
    squad = build_task("squad")
    assert len(squad.load_original("validation")) == 10570
    assert len(squad.splits(("test",))["test"]) == 1000


def test_protocol_sampling_is_deterministic_disjoint_and_seeded(data_root):
    a, b, c = (build_task("rte", s).splits() for s in (0, 0, 1))
    for split in ("train", "val", "test"):
        assert uids(a[split]) == uids(b[split])
    assert not set(uids(a["train"])) & set(uids(a["val"]))
    assert uids(a["train"]) != uids(c["train"]) and uids(a["val"]) != uids(c["val"])
    assert uids(a["test"]) == uids(c["test"])  # 277 < 1000: the whole validation file, any seed
    assert uids(build_task("boolq", 0).splits(("test",))["test"]) != uids(
        build_task("boolq", 1).splits(("test",))["test"])  # 3270 > 1000: a seeded sample
    small = build_task("rte", 0, num_train=100, num_dev=50, num_test=10).splits()
    assert [len(small[s]) for s in ("train", "val", "test")] == [100, 50, 10]
    assert uids(build_task("rte", 0, num_dev=50).splits(("val",))["val"]) == uids(small["val"])
    assert uids(build_task("rte", 0, num_dev=50).splits(("train",))["train"])[:100] == uids(small["train"])


def test_test_split_reads_only_the_validation_file(data_root):
    boolq = build_task("boolq")  # the mirror has BoolQ val but not train
    test = boolq.splits(("test",))
    assert list(test) == ["test"] and len(test["test"]) == 1000
    with pytest.raises(MissingDataError):
        boolq.splits(("val",))


def test_protocol_labels_in_range(data_root):
    for name in ["sst2", "rte", "cb", "wsc", "wic", "multirc", "copa"]:
        task = build_task(name)
        for split, examples in task.splits().items():
            n = task.num_labels if task.kind == "classification" else 2
            assert {ex.label for ex in examples} <= set(range(n)), (name, split)
            if task.kind == "classification":
                assert [c.strip() for c in task.causal_continuations(examples[0])] == list(task.label_words)


def _first(name: str, split: str = "validation", i: int = 0) -> tuple:
    task = build_task(name)
    return task, task.load_original(split)[i]


def test_mezo_templates_on_known_rows(data_root):
    task, ex = _first("sst2")
    assert task.causal_prompt(ex) == "it 's a charming and often affecting journey . It was"
    assert task.causal_continuations(ex) == [" terrible", " great"] and ex.label == 1
    assert task.masked_prompt(ex) == ("it 's a charming and often affecting journey . It was", ".")
    assert task.text_pair(ex) == ("it 's a charming and often affecting journey .", None)

    task, ex = _first("rte")
    assert task.causal_prompt(ex) == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
        "Christopher Reeve Foundation.\nDoes this mean that \"Christopher Reeve had an accident.\" is true? "
        "Yes or No?\n")
    assert task.causal_continuations(ex) == ["Yes", "No"] and ex.label == 1  # not_entailment

    task, ex = _first("cb")
    assert task.causal_prompt(ex) == (
        "Suppose Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his own portion "
        "of titanic anatomy to shaft? Did he think he was helping? Can we infer that \"Valence was helping\"? "
        "Yes, No, or Maybe?\n")
    assert task.causal_continuations(ex) == ["Yes", "No", "Maybe"] and ex.label == 1  # contradiction

    task, ex = _first("boolq")
    prompt = task.causal_prompt(ex)
    assert prompt.startswith("Ethanol fuel -- All biomass goes through")
    assert prompt.endswith(" Does ethanol take more energy make that produces?\n")  # BoolQTemplateV3
    assert task.causal_continuations(ex) == ["No", "Yes"] and ex.label == 0

    task, ex = _first("wsc")
    assert task.causal_prompt(ex) == (
        "Bernard , who had not told the government official that he was less than 21 when he filed for a homestead "
        "claim, did not consider that he had done anything dishonest. Still, anyone who knew that he was 19 years "
        "old could take his claim away from him .\nIn the previous sentence, does the pronoun \"him\" refer to "
        "anyone? Yes or No?\n")
    assert ex.label == 0

    task, ex = _first("wic")
    assert task.causal_prompt(ex) == (
        "Does the word \"class\" have the same meaning in these two sentences? Yes, No?\nAn emerging professional "
        "class.\nApologizing for losing your temper, even though you were badly provoked, showed real class.\n")
    assert ex.label == 0

    task, ex = _first("multirc")
    prompt = task.causal_prompt(ex)
    assert prompt.startswith("What causes a change in motion? The application of a force.")
    assert prompt.endswith("\nQuestion: Would the mass of a baseball affect how much force you have to use to pick "
                           "it up?\nI found this answer \"No\". Is that correct? Yes or No?\n")
    assert ex.label == 0 and ex.uid == "0-0-0"

    task, ex = _first("copa", "train", 236)
    assert ex.fields["premise"] == "The man broke his toe."
    assert task.causal_prompt(ex) == "The man broke his toe because"
    assert task.causal_continuations(ex) == [" he got a hole in his sock.", " he dropped a hammer on his foot."]
    assert ex.label == 1
    with pytest.raises(NotImplementedError, match="multiple_choice"):
        task.text_pair(ex)

    task, ex = _first("squad")
    context = ex.fields["context"]
    assert context.startswith("Super Bowl 50 was an American football game")
    assert task.causal_prompt(ex) == (f"Title: Super_Bowl_50\nContext: {context}\nQuestion: Which NFL team "
                                      "represented the AFC at Super Bowl 50?\nAnswer:")
    assert ex.answers == ("Denver Broncos",)  # three identical gold answers, deduplicated
    assert task.causal_continuations(ex) == [" Denver Broncos\n"]
    for method in (task.text_pair, task.masked_prompt):
        with pytest.raises(NotImplementedError, match="generation"):
            method(ex)


def test_squad_training_sample(data_root):
    splits = build_task("squad").splits(("train", "val"))
    assert (len(splits["train"]), len(splits["val"])) == (1000, 500)
    assert not set(uids(splits["train"])) & set(uids(splits["val"]))
    assert all(u.startswith("squad11-train-") for u in uids(splits["train"]))  # the rebuilt file's ids


def _linked_mirror(tmp_path: Path, links: dict[str, str]) -> Path:
    """A mirror holding symlinks (named as the official split files) to real files of ../shared/data."""
    for name, target in links.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(DATA / target)
    return tmp_path


def test_record_reads_superglue_jsonl(data_root, tmp_path, monkeypatch):
    root = _linked_mirror(tmp_path, {"ReCoRD/val.jsonl": "ReCoRD/fewglue_32dev/dev32.jsonl"})
    monkeypatch.setenv(DATA_ENV, str(root))
    task = build_task("record")
    examples = task.load_original("validation")
    assert len(examples) == 32 and all(ex.label is not None for ex in examples)
    ex = examples[0]
    assert ex.candidates[:4] == ("Islamabad", "Pakistan", "CNN", "Benazir Bhutto")  # deduplicated, in order
    assert len(ex.candidates) == len(set(ex.candidates)) == 11
    assert ex.answers == ("Benazir Bhutto", "Bhutto") and ex.candidates[ex.label] == "Benazir Bhutto"
    assert task.causal_prompt(ex).startswith("Islamabad, Pakistan (CNN) -- The 24-year-old son")
    assert task.causal_prompt(ex).endswith("\n- Thousands gathered near the home to mark the fifth anniversary of "
                                           "her death\n-")
    assert task.causal_continuations(ex)[3] == " They will sew our lips, but we will chant, 'Long live Benazir Bhutto.'"
    assert len(task.causal_continuations(ex)) == len(ex.candidates)
    assert len(task.splits(("test",))["test"]) == 32


def test_drop_reads_the_official_format(data_root, tmp_path, monkeypatch):
    # the 300-question file is in the official DROP format; it is linked here only to test the reader
    root = _linked_mirror(tmp_path, {
        "DROP/drop_dataset_dev.json": "DROP/succesive_prompting_train300/drop_dataset_train_300_annotations.json"})
    monkeypatch.setenv(DATA_ENV, str(root))
    task = build_task("drop")
    examples = task.load_original("validation")
    assert len(examples) == 299
    ex = examples[0]
    assert ex.uid == "e4484b02-b56e-460b-a4a2-a0d56422c658" and ex.answers == ("transit",)
    assert task.causal_prompt(ex).startswith("Passage: ")
    assert task.causal_prompt(ex).endswith("\nQuestion: Which group in percent of commuters in Dallas in 2009 is "
                                           "larger: transit or cycling?\nAnswer:")
    assert task.causal_continuations(ex) == [" transit\n"]


def test_drop_converts_numbers_dates_and_validated_answers(tmp_path, monkeypatch):
    import json

    qa = {"question": "Q?", "query_id": "q1", "answer": {"number": "", "date": {"day": "4", "month": "July",
          "year": "1776"}, "spans": []}, "validated_answers": [
        {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["Fourth of July", "1776"]},
        {"number": "3", "date": {"day": "", "month": "", "year": ""}, "spans": []}]}
    (tmp_path / "DROP").mkdir()
    (tmp_path / "DROP" / "drop_dataset_dev.json").write_text(json.dumps({"s1": {"passage": "P.", "qa_pairs": [qa]}}))
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    [ex] = build_task("drop").load_original("validation")
    assert ex.answers == ("4 July 1776", "Fourth of July", "1776", "3")


# --- missing data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,split,file,hub", [
    ("boolq", "train", "BoolQ/train.jsonl", "super_glue/boolq"),
    ("drop", "train", "DROP/drop_dataset_train.json", "drop"),
    ("drop", "test", "DROP/drop_dataset_dev.json", "drop"),
    ("record", "val", "ReCoRD/train.jsonl", "super_glue/record"),
])
def test_missing_files_name_the_file_the_variable_and_the_hub(data_root, name, split, file, hub):
    with pytest.raises(MissingDataError) as err:
        build_task(name).splits((split,))
    message = str(err.value)
    assert str(data_root / file) in message and DATA_ENV in message and f"Hub dataset {hub}" in message
    if name == "drop":
        assert "never used" in message  # the partial DROP files are not silently used instead


def test_kshot_needs_the_mirror(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(MissingDataError, match=f"{DATA_ENV}.*SST-2/k-shot-1k-test/16-42/train.tsv"):
        build_task("sst2-k16").splits(("train",))


# --- Hugging Face Hub path (DPFT_DATA_DIR unset; load_dataset mocked) -------------------------------
HUB_ROWS = {
    ("glue", "sst2", "validation"): [{"sentence": "a gem . ", "label": 1, "idx": 0}],
    ("super_glue", "rte", "validation"): [{"premise": "P.", "hypothesis": "H.", "label": 1, "idx": 7}],
    ("super_glue", "boolq", "train"): [{"question": "is it", "passage": "Text.", "label": 1, "idx": 3}],
    ("super_glue", "multirc", "validation"): [{"paragraph": "Par.", "question": "Q?", "answer": "A", "label": 1,
                                               "idx": {"paragraph": 0, "question": 1, "answer": 2}}],
    ("super_glue", "record", "validation"): [{"passage": "X met Y.\n@highlight\nZ", "query": "@placeholder won",
                                              "entities": ["X", "Y", "X"], "answers": ["Y"],
                                              "idx": {"passage": 0, "query": 5}}],
    ("squad", "validation"): [{"id": "s1", "title": "T", "context": "C.", "question": " Q? ",
                               "answers": {"text": ["a", "a", "b"], "answer_start": [0, 0, 2]}}],
    ("drop", "validation"): [{"section_id": "n1", "query_id": "d1", "passage": "P.", "question": "How many?",
                              "answers_spans": {"spans": ["3"], "types": ["number"]}}],
}


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(*args, split):
        calls.append((*args, split))
        if (*args, split) not in HUB_ROWS:
            raise ConnectionError("Hub unreachable")
        return HUB_ROWS[(*args, split)]

    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_rows_become_the_same_examples(fake_hub):
    [ex] = build_task("sst2").splits(("test",))["test"]
    assert ex.label == 1 and build_task("sst2").causal_prompt(ex) == "a gem . It was"
    [ex] = build_task("rte").splits(("test",))["test"]
    assert ex.label == 1 and ex.fields["premise"] == "P." and ex.uid == "7"
    [ex] = build_task("boolq", num_dev=0).splits(("train",))["train"]
    assert ex.label == 1 and build_task("boolq").causal_prompt(ex) == "Text. Is it?\n"
    [ex] = build_task("multirc").splits(("test",))["test"]
    assert ex.label == 1 and ex.uid == "0-1-2"
    [ex] = build_task("record").splits(("test",))["test"]
    assert ex.candidates == ("X", "Y") and ex.label == 1 and ex.uid == "5"
    assert build_task("record").causal_prompt(ex) == "X met Y.\n- Z\n-"
    assert build_task("record").causal_continuations(ex) == [" X won", " Y won"]
    [ex] = build_task("squad").splits(("test",))["test"]
    assert ex.answers == ("a", "b") and build_task("squad").causal_prompt(ex) == "Title: T\nContext: C.\nQuestion: Q?\nAnswer:"
    [ex] = build_task("drop").splits(("test",))["test"]
    assert ex.answers == ("3",) and build_task("drop").causal_continuations(ex) == [" 3\n"]
    assert ("glue", "sst2", "validation") in fake_hub and ("drop", "validation") in fake_hub


def test_hub_failure_is_a_missing_data_error(fake_hub):
    with pytest.raises(MissingDataError, match=rf"super_glue/wic.*Hub.*{DATA_ENV}.*shared/data.*WiC/train.jsonl"):
        build_task("wic").splits(("train",))
