"""The benchmark harness produces well-formed records (no timing assertions: timings live in `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from dpft.bench.run import (
    balanced_orders,
    bench_dpsgd,
    bench_zo,
    build,
    dp_model,
    format_table,
    keep_freed_memory,
    main,
    make_batch,
    mezo_reference_loss,
    mezo_reference_step,
    peak_memory,
    per_example_loss,
    record,
    side_by_side,
    timing_range,
)

KEYS = {"name", "method", "model_shape", "params", "batch_size", "seq_len", "device", "ratio", "target", "medians"}


def test_zeroth_order_and_dpsgd_records_are_complete():
    records = bench_zo("opt-tiny", batch=2, length=8, device="cpu", repeats=1)
    records += bench_dpsgd("roberta-tiny", batch=2, length=8, device="cpu", repeats=1)
    names = {r["name"] for r in records}
    assert {"zo_step_over_two_forwards", "zo_step_over_mezo_reference", "zo_step_over_mezo_reference_same_loss",
            "zo_seconds_per_step", "dpsgd_step_over_nonprivate", "opacus_step_over_nonprivate"} <= names
    for r in records:
        assert KEYS <= set(r)
        if r["ratio"] is not None:
            assert r["ratio"] > 0 and all(v > 0 for v in r["medians"].values())
            assert r["repeat_ratios"] == [pytest.approx(r["ratio"])]  # one repeat: its ratio is the ratio
        else:
            assert r["error"]  # Opacus missing or failing is reported, not hidden
    assert {r["method"] for r in records if r["name"] == "zo_step_over_two_forwards"} == {"mezo", "dpzo", "dpzero"}
    generators = {r["name"]: r["z_generator"] for r in records if "z_generator" in r}
    assert generators == {"zo_step_over_two_forwards": "philox", "zo_step_torch_z_over_two_forwards": "torch"}
    # where Opacus ran, our DP step is compared with it directly, from the same medians
    opacus = [r for r in records if r["name"] == "opacus_step_over_nonprivate" and r["ratio"] is not None]
    ours_over_opacus = [r for r in records if r["name"] == "dpsgd_step_over_opacus"]
    assert len(ours_over_opacus) == len(opacus)
    for r in ours_over_opacus:
        assert r["ratio"] == r["medians"]["dpsgd_step"] / r["medians"]["opacus_step"] and r["target"] == 1.0
    assert "zo_step_over_two_forwards" in format_table(records)


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_put_every_function_after_every_other_equally_often(n):
    orders = balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n) and all(sorted(o) == list(range(n)) for o in orders)
    after = Counter((a, b) for o in orders for a, b in zip(o, o[1:]))
    assert set(after) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(after.values())) <= 1  # each ordered pair as often as any other
    assert len({o[0] for o in orders}) == n  # and each function first in some order
    for o, next_ in zip(orders, orders[1:]):  # consecutive orders share no neighbours (3 repeats of 3 functions)
        assert not set(zip(o, o[1:])) & set(zip(next_, next_[1:]))


def test_each_repeat_runs_the_functions_in_its_balanced_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    medians, times = side_by_side(fns, repeats=5, device="cpu", warmed=("b",))
    orders = [["abcd"[i] for i in o] for o in balanced_orders(4)]
    assert calls == ["a", "c", "d"] + orders[0] + orders[1] + orders[2] + orders[3] + orders[0]  # warm-ups, cycling
    assert set(medians) == set(times) == set("abcd") and all(len(t) == 5 for t in times.values())


def test_timing_range_is_the_wider_relative_spread_of_the_two_sides():
    times = {"a": [1.0, 2.0, 3.0], "b": [2.0, 2.2, 2.0]}
    record_ = record("x", "m", "s", 1, 1, 1, "cpu", {"a": 2.0, "b": 2.0}, "a", "b", times=times)
    assert timing_range(record_) == pytest.approx(1.0)  # (3 - 1) / 2
    assert record_["repeat_ratios"] == pytest.approx([0.5, 2.0 / 2.2, 1.5])  # each repeat's own pair
    assert timing_range({"medians": {}}) is None  # memory records have no timings
    table = format_table([record_])
    assert "| timing range |" in table and "| 0.500–1.500 |" in table


@pytest.mark.parametrize(("shape", "at"), [("opt-tiny", 9), ("llama-tiny", 9), ("roberta-tiny", 5)])
@pytest.mark.parametrize("mode", ["plain", "lora"])
def test_the_label_is_read_at_a_causal_models_last_token_and_a_masked_models_middle(shape, at, mode):
    model = build(shape, "cpu") if mode == "plain" else dp_model(shape, "lora", "cpu")  # under peft's wrapper
    assert make_batch(model, 3, 10, "cpu")["at"].flatten().tolist() == [at] * 3


@pytest.mark.parametrize("shape", ["opt-tiny", "llama-tiny", "roberta-tiny"])
def test_the_reference_computes_the_same_loss_from_every_position(shape):
    """The reference differs from our step in how it gets the loss, not in the loss."""
    model = build(shape, "cpu")
    data = make_batch(model, 3, 10, "cpu")
    with torch.no_grad():
        ours, reference = per_example_loss(model, data), mezo_reference_loss(model, data)
    assert ours.shape == (3,) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_mezo_reference_is_a_step_that_restores_its_perturbations():
    model = build("opt-tiny", "cpu")
    data = make_batch(model, 2, 8, "cpu")
    start = [p.detach().clone() for p in model.parameters()]
    mezo_reference_step(model, data, seed=3, lr=0.0)  # +φz, -2φz, +φz: back where it started
    for p, p0 in zip(model.parameters(), start):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=1e-6)
    mezo_reference_step(model, data, seed=3, lr=1.0)
    assert all(not torch.equal(p.detach(), p0) for p, p0 in zip(model.parameters(), start))


def test_opacus_runs_in_both_modes_and_is_skipped_where_it_would_not_fit(monkeypatch):
    pytest.importorskip("opacus")
    import dpft.bench.run as bench

    records = bench_dpsgd("roberta-tiny", batch=2, length=8, device="cpu", repeats=1)
    assert {r["method"] for r in records if r["name"] == "dpsgd_step_over_opacus"} == {"dpsgd_full", "dpsgd_lora"}
    # on OPT only the LoRA mode runs; the full mode says why it does not
    records = bench_dpsgd("opt-tiny", batch=2, length=8, device="cpu", repeats=1)
    assert {r["method"] for r in records if r["name"] == "dpsgd_step_over_opacus"} == {"dpsgd_lora"}
    assert "flattens the tokens" in next(r["error"] for r in records if r["method"] == "opacus_full")
    monkeypatch.setattr(bench, "_free_memory", lambda device: 1024.0)
    records = bench_dpsgd("roberta-tiny", batch=2, length=8, device="cpu", repeats=1)
    skipped = [r for r in records if r["name"] == "opacus_step_over_nonprivate"]
    assert len(skipped) == 2 and all(r["ratio"] is None and "per-sample gradients" in r["error"] for r in skipped)


def test_cli_writes_bench_json(tmp_path, monkeypatch):
    import dpft.bench.run as bench

    monkeypatch.setattr(bench, "run", lambda quick, device, repeats, *grid: bench_zo("opt-tiny", 2, 8, device, 1))
    out = tmp_path / "bench.json"
    main(["--quick", "--out", str(out), "--device", "cpu", "--repeats", "1"])
    records = json.loads(out.read_text())
    assert records and all(KEYS <= set(r) for r in records)
    assert records[0]["environment"]["allocator"] == ("freed memory kept" if sys.platform.startswith("linux")
                                                      else "glibc default")


def test_a_part_of_the_grid_measures_only_its_points(tmp_path):
    """`--only zo --shapes opt-tiny --lengths 8 --batches 2 4`: the ZO records of those two points, nothing else;
    `--only memory` at one point: its peak-memory record alone (each peak in fresh processes: seconds each)."""
    out = tmp_path / "bench.json"
    main(["--only", "zo", "--shapes", "opt-tiny", "--lengths", "8", "--batches", "2", "4", "--out", str(out),
          "--device", "cpu", "--repeats", "1"])
    records = json.loads(out.read_text())
    assert {(r["model_shape"], r["batch_size"], r["seq_len"]) for r in records} == {("opt-tiny", 2, 8), ("opt-tiny", 4, 8)}
    assert {r["name"] for r in records} == {"zo_step_over_two_forwards", "zo_step_torch_z_over_two_forwards",
                                            "zo_step_over_mezo_reference",
                                            "zo_step_over_mezo_reference_same_loss", "zo_seconds_per_step"}
    main(["--only", "memory", "--shapes", "opt-tiny", "--lengths", "8", "--batches", "2", "--out", str(out),
          "--device", "cpu"])
    memory = json.loads(out.read_text())
    assert [(r["name"], r["batch_size"], r["seq_len"]) for r in memory] == [("zo_peak_memory_over_inference", 2, 8)]
    assert all(v > 0 for v in memory[0]["medians"].values()) and memory[0]["medians"]
    with pytest.raises(SystemExit):
        main(["--quick", "--shapes", "opt-tiny", "--out", str(out)])


def test_a_peak_is_measured_from_live_memory_not_from_an_earlier_peak():
    big = peak_memory(lambda: torch.ones(2**26).sum(), "cpu")  # 256 MiB, freed when done
    small = peak_memory(lambda: None, "cpu")
    assert small < big - 200 * 2**20


# how much of a freed 64 MiB tensor stays resident, in MiB (a fresh process each: the setting is process-wide);
# glibc maps a block that big by itself and unmaps it when freed
FREED = """
import sys, torch
from dpft.bench.run import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
rss = lambda: int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS"))) / 1024
x = torch.ones(2**24)
held = rss()
del x
print(round(64 - (held - rss())))
"""


def _kept_mib(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", FREED, mode], check=True, capture_output=True, text=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_freed_memory_stays_in_the_heap_for_the_next_contender():
    assert abs(_kept_mib("default")) <= 2
    assert abs(_kept_mib("kept") - 64) <= 2
    assert keep_freed_memory()


def test_ddp_scaling_record_runs_two_gloo_processes():
    from dpft.bench.run import bench_ddp

    record = bench_ddp("opt-tiny", batch=4, length=8, repeats=1)
    assert record["name"] == "ddp_scaling_efficiency" and record["processes"] == 2
    assert KEYS <= set(record) and record["ratio"] > 0
    assert set(record["medians"]) == {"one_process_step", "2_process_step"}
