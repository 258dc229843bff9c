"""Token for token: under `task.protocol=paper` the model reads the token ids of the papers' reference code (MeZO's
for the MeZO tasks on OPT, LM-BFF's for the k-shot tasks on RoBERTa), and no truncation, under either protocol and
at any length, removes the template or the mask.

tests/data/reference_tokens.json holds the reference code's token ids for a handful of real examples of every task
dpft shares with it (the first rows of every file and rows with a notable property: WSC's fixed spans, ReCoRD's
multi-answer golds, whitespace-edged and truncated rows, QNLI test 31, ...). It was written once by the reference
code itself, fed the mirror's rows, with the command below; tools/reference_tokens.py's docstring sets up the
checkouts and the reference's transformers 4.28.1:

    PYTHONPATH=/tmp/tf428 .venv/bin/python tools/reference_tokens.py --data ../shared/data \\
        --mezo /tmp/MeZO/large_models --lmbff /tmp/DPZero/roberta --hf-datasets /tmp/hf-datasets \\
        --out tests/data/reference_tokens.json
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dpft.data.task_base import Rendered, Task
from dpft.data.tasks import TASKS, build_task
from dpft.models.loading import load_tokenizer
from dpft.models.scoring import build_scorer, check_compatible
from tests.conftest import requires_data

pytestmark = requires_data

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests/data/reference_tokens.json").read_text())
_spec = importlib.util.spec_from_file_location("compare_reference_tokens", ROOT / "tools/compare_reference_tokens.py")
compare_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_tool)


def tokenizer(family: str):
    name = {"mezo": "opt", "lmbff": "roberta-base", "causal_lm": "opt", "masked_lm": "roberta-base"}[family]
    return load_tokenizer(OmegaConf.create({"name": name, "tokenizer_mirror": f"tokenizers/{name}"}))


TOKENIZERS = {}


def scorer_for(name: str, kind: str, protocol: str, max_length: int, max_new_tokens: int = 50):
    if kind not in TOKENIZERS:
        TOKENIZERS[kind] = tokenizer(kind)
    task = build_task(name, 42 if "-k" in name else None, protocol=protocol)
    return build_scorer(kind, task, TOKENIZERS[kind], max_length, max_new_tokens)


# --- the reference's token ids -----------------------------------------------------------------------------
def test_the_fixture_covers_every_task_dpft_shares_with_the_reference():
    shared = {n for n, cls in TASKS.items() if "-k" not in n} | {n for n in TASKS if n.endswith("-k512")}
    assert {compare_tool.dpft_name(key) for key in FIXTURE["tasks"]} == shared
    assert {key for key in FIXTURE["tasks"] if "@" in key} == {  # MeZO's left cut, at lengths that cut
        "mezo/BoolQ@128", "mezo/MultiRC@128", "mezo/ReCoRD@256", "mezo/RTE@48", "mezo/SST2@12"}
    assert FIXTURE["transformers"] == "4.28.1" and "reference_tokens.py" in FIXTURE["command"]


@pytest.mark.parametrize("key", sorted(FIXTURE["tasks"]))
def test_paper_protocol_feeds_the_reference_token_ids(key):
    """Every fixture example: the prompt, every candidate's row and scored span, the training row, the gold, the
    mask position and the label words, as dpft's scorer collates them, equal the reference code's."""
    spec = FIXTURE["tasks"][key]
    kind = "causal_lm" if spec["family"] == "mezo" else "masked_lm"
    scorer = scorer_for(compare_tool.dpft_name(key), kind, "paper", spec["max_length"], spec.get("max_new_tokens", 50))
    misses = {}
    for example in spec["examples"]:
        why = compare_tool.compare(spec, example, scorer.task, scorer, Path(compare_tool.os.environ["DPFT_DATA_DIR"]))
        if why is not None:
            misses[(example.get("original", example.get("split")), example.get("uid", example.get("index")))] = why
    assert not misses, misses


def test_the_cited_differences_are_gone_under_the_paper_protocol():
    paper, dpft = (scorer_for("boolq", "causal_lm", p, 2048) for p in ("paper", "dpft"))
    [ex_paper], [ex_dpft] = ([e for e in s.task.load_original("validation")[:1]] for s in (paper, dpft))
    assert paper.rows(ex_paper, False)[0][0][0] == 0 and dpft.rows(ex_dpft, False)[0][0][0] == 2  # <s> vs </s>
    assert ex_paper.fields["passage"].startswith("All biomass goes through")  # HF boolq: no title
    assert ex_dpft.fields["passage"].startswith("Ethanol fuel -- All biomass goes through")

    wsc = build_task("wsc").load_original("validation")[5]  # wsc.fixed's span, under both protocols
    assert "refer to the table?" in build_task("wsc").causal_prompt(wsc)

    record = scorer_for("record", "causal_lm", "paper", 2048).task
    rows = record.local_rows(Path(compare_tool.os.environ["DPFT_DATA_DIR"]) / "ReCoRD/fewglue_32dev/dev32.jsonl",
                             "validation")
    norad = next(record.example(r) for r in rows if r["idx"] == 99251)
    assert norad.candidates[norad.label] == "NORAD"  # HF sorts the answers; MeZO trains on the first
    dpft_record = build_task("record")
    assert dpft_record.example({**next(r for r in dpft_record.local_rows(
        Path(compare_tool.os.environ["DPFT_DATA_DIR"]) / "ReCoRD/fewglue_32dev/dev32.jsonl", "validation")
        if r["idx"] == 99251)}).label == norad.candidates.index("North American Aerospace Defense Command")

    qqp = build_task("qqp-k16")
    ex = qqp.splits(("train",))["train"][0]
    assert qqp.masked_prompt(ex)[0] == "Why do some people think that having a baby is a blessing?"  # *sent_0*


def test_drop_golds_per_split_under_the_paper_protocol(tmp_path, monkeypatch):
    qa = {"question": "Q?", "query_id": "q1", "answer": {"number": "5", "date": {}, "spans": []},
          "validated_answers": [{"number": "", "date": {}, "spans": ["five", "5 points"]}]}
    both = {"number": "3", "date": {"day": "", "month": "May", "year": ""}, "spans": []}
    odd = {"question": "R?", "query_id": "q2", "answer": both, "validated_answers": [both]}
    path = tmp_path / "drop.json"
    path.write_text(json.dumps({"s1": {"passage": "P.", "qa_pairs": [qa, odd]}}))
    examples = lambda protocol, split: [build_task("drop", protocol=protocol).example(r)  # noqa: E731
                                        for r in build_task("drop", protocol=protocol).local_rows(path, split)]
    assert [e.answers for e in examples("paper", "train")] == [("5",)]  # HF: the answer; no number-and-date one
    assert [e.answers for e in examples("paper", "validation")] == [("five", "5 points")]  # validated answers only
    assert [e.answers for e in examples("dpft", "validation")] == [("5", "five", "5 points"), ("3",)]  # DROP's own


# --- truncation keeps the template and the mask ------------------------------------------------------------
def template_pieces(rendered: Rendered) -> list[str]:
    """The template's text between the example's fields, in order (whitespace-only pieces left out)."""
    pieces, position = [], 0
    for s, e in sorted(rendered.fields) + [(len(rendered.text), len(rendered.text))]:
        if rendered.text[position:s].strip():
            pieces.append(rendered.text[position:s].strip())
        position = max(position, e)
    return pieces


def in_order(pieces: list[str], text: str) -> bool:
    position = 0
    for piece in pieces:
        position = text.find(piece, position)
        if position < 0:
            return False
        position += len(piece)
    return True


def long_examples(task, n: int = 2):
    """The longest examples (in characters) among the first 40 of the evaluation split."""
    if task.name == "drop":  # the mirror has no DROP split: its 300 train questions, in DROP's format
        path = compare_tool.os.environ["DPFT_DATA_DIR"] + "/DROP/succesive_prompting_train300/" \
            "drop_dataset_train_300_annotations.json"
        examples = [e for e in map(task.example, task.local_rows(Path(path), "train")) if e][:40]
    elif task.name == "record":
        path = compare_tool.os.environ["DPFT_DATA_DIR"] + "/ReCoRD/fewglue_32dev/dev32.jsonl"
        examples = [e for e in map(task.example, task.local_rows(Path(path), "validation")) if e][:40]
    elif "-k" in task.name:
        examples = task.splits(("test",))["test"][:40]
    else:
        examples = task.load_original("validation")[:40]
    return sorted(examples, key=lambda e: -sum(len(str(v)) for v in e.fields.values()))[:n]


CASES = [(name, kind, protocol) for name in sorted(TASKS) if "-k16" not in name
         for kind, protocol in [("causal_lm", "dpft"), ("causal_lm", "paper"), ("masked_lm", "dpft"),
                                ("masked_lm", "paper")]
         if (kind == "causal_lm" or TASKS[name].kind == "classification" and
             TASKS[name].masked_parts is not Task.masked_parts)
         and (protocol == "dpft" or kind in TASKS[name].paper_models)]


def bare_tokens(scorer, rendered: Rendered) -> int:
    """Tokens of a rendered text with every field of the example's emptied: its template alone."""
    for j in range(len(rendered.fields)):
        rendered = rendered.cut(j, rendered.fields[j][0])
    return len(scorer._encode(rendered.text))


@pytest.mark.parametrize("name,kind,protocol", CASES)
def test_no_length_cuts_the_template_or_the_mask(name, kind, protocol):
    """From the example's own length down to a few tokens more than its template alone, every row fits, holds the
    template's text in order and each candidate whole (or the mask, and </s> under the dpft protocol): only the
    example's text is shorter. A length the template alone does not fit is an error, not a cut template."""
    full_scorer = scorer_for(name, kind, protocol, 10**6)
    task = full_scorer.task
    for ex in long_examples(task):
        if kind == "causal_lm":
            encoded, sep, options = task.causal_parts(ex)
            options = [None] if task.kind == "generation" else options
            full = max(len(ids) for ids, _ in full_scorer.rows(ex, False))
            pieces = template_pieces(encoded)
            floor = 1 + bare_tokens(full_scorer, encoded) + max(
                len(full_scorer._encode(sep + o)) if o is not None else 0 for o in options)
        else:
            full = len(full_scorer.row(ex)[0])
            left, right = task.masked_parts(ex)
            pieces = template_pieces(left) + template_pieces(right)
            floor = 3 + bare_tokens(full_scorer, left) + bare_tokens(full_scorer, right)
        floor += 4  # the template's tokens may merge differently with an emptied field
        extra = full_scorer.max_new_tokens if task.kind == "generation" else 0
        lengths = {full, full - 1, full - 3, (3 * full) // 4, full // 2, full // 3, floor}
        for length in sorted(n for n in lengths if floor <= n <= full):
            check_row(scorer_for(name, kind, protocol, length + extra), ex, pieces, kind, protocol)
        with pytest.raises(ValueError, match="template"):
            check_row(scorer_for(name, kind, protocol, 2 + extra), ex, pieces, kind, protocol)


def check_row(scorer, ex, pieces: list[str], kind: str, protocol: str) -> None:
    tok = scorer.tokenizer
    if kind == "masked_lm":
        row, mask = scorer.row(ex)
        assert len(row) <= scorer.max_length and row[mask] == tok.mask_token_id and row[0] == tok.cls_token_id
        if protocol == "dpft":
            assert row[-1] == tok.sep_token_id  # (LM-BFF's own tail cut takes the closing </s>: the paper protocol)
        assert in_order(pieces, tok.decode(row[1:mask]) + "<mask>" + tok.decode(row[mask + 1:])), tok.decode(row)
        return
    task = scorer.task
    _, sep, options = task.causal_parts(ex)
    rows = scorer.rows(ex, False)
    for (ids, scored), option in zip(rows, options if task.kind != "generation" else [None]):
        assert len(ids) <= scorer.max_length - (scorer.max_new_tokens if task.kind == "generation" else 0)
        text = tok.decode(ids[1:])
        assert in_order(pieces, text), (pieces, text)
        if option is not None:
            assert tok.decode(ids[len(ids) - scored:]).strip() == (sep + option).strip()


def test_a_too_short_length_is_refused_with_the_fix():
    scorer = scorer_for("squad", "causal_lm", "dpft", 60)
    ex = build_task("squad").load_original("validation")[0]
    with pytest.raises(ValueError, match="template alone needs .* raise task.max_length"):
        scorer.collate([ex], train=False)


def test_qnli_test_31_keeps_its_question_at_128():
    """dpft used to cut the text before <mask>, template included: `<s><mask>, sculptors...`."""
    for protocol in ("dpft", "paper"):
        scorer = scorer_for("qnli-k512", "masked_lm", protocol, 128)
        ex = scorer.task.splits(("test",))["test"][31]
        row, mask = scorer.row(ex)
        assert scorer.tokenizer.decode(row[:mask + 1]).startswith("<s>Which British sculptor whose work")
        assert scorer.tokenizer.decode(row[:mask + 1]).endswith("collection?<mask>")


def test_single_token_words_leave_room_for_the_word():
    """A one-token label word is scored at the prompt's last position: the prompt keeps max_length - 2 tokens
    after BOS (the word is the row's last), as MeZO's whole row does."""
    for protocol in ("dpft", "paper"):
        scorer = scorer_for("boolq", "causal_lm", protocol, 64)
        ex = scorer.task.load_original("validation")[0]
        batch = scorer.collate([ex], train=False)
        assert "words" in batch and batch["input_ids"].shape[1] == 63


# --- configuration, results and the paper protocol's scope -------------------------------------------------
def test_protocol_is_validated_and_recorded():
    with pytest.raises(ValueError, match="task.protocol='pape'; valid: dpft, paper"):
        build_task("rte", protocol="pape")
    record = build_task("mnli-k512", protocol="paper").protocol_record(128)
    assert record == {"name": "paper", "reference": build_task("mnli-k512").paper, "max_length": 128,
                      "paper_max_length": 256, "as_paper": False}
    assert build_task("squad", protocol="paper").protocol_record(2048, 50)["as_paper"]
    assert not build_task("squad").protocol_record(2048, 50)["as_paper"]


def test_paper_protocol_with_a_model_it_has_no_reference_for_is_refused():
    with pytest.raises(ValueError, match="task.protocol=paper reproduces LM-BFF.*task.protocol=dpft"):
        check_compatible("causal_lm", build_task("sst2-k512", protocol="paper"), "opt-tiny")
    check_compatible("masked_lm", build_task("sst2-k512", protocol="paper"), "roberta-tiny")


def test_paper_protocol_at_other_lengths_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="dpft.models.scoring"):
        scorer_for("rte-k512", "masked_lm", "paper", 128)
    assert "reference used {'max_length': 256}" in caplog.text


def test_results_json_records_the_protocol(make_cfg):
    from dpft.results import read_results
    from dpft.train import run

    cfg = make_cfg("model=opt-tiny", "task=rte", "method=zero_shot", "task.protocol=paper", "task.max_length=2048")
    run(cfg)
    results = read_results(Path(cfg.paths.output_dir) / "results.json")
    assert results["protocol"] == {"name": "paper", "reference": build_task("rte").paper, "max_length": 2048,
                                   "paper_max_length": 2048, "as_paper": True}
    assert results["config"]["task"]["protocol"] == "paper"
    assert results["summary"]["protocol/as_paper"] is True and results["summary"]["protocol/name"] == "paper"
