"""The benchmark harness produces well-formed records (no timing assertions: timings live in `make bench`)."""

from __future__ import annotations

import json

import pytest

from dpft.bench.run import bench_dpsgd, bench_zo, format_table, main

KEYS = {"name", "method", "model_shape", "params", "batch_size", "seq_len", "device", "ratio", "target", "medians"}


def test_zeroth_order_and_dpsgd_records_are_complete():
    records = bench_zo("opt-tiny", batch=2, length=8, device="cpu", repeats=1)
    records += bench_dpsgd("roberta-tiny", batch=2, length=8, device="cpu", repeats=1)
    names = {r["name"] for r in records}
    assert {"zo_step_over_two_forwards", "zo_step_over_mezo_reference", "zo_seconds_per_step",
            "dpsgd_step_over_nonprivate", "opacus_step_over_nonprivate"} <= names
    for r in records:
        assert KEYS <= set(r)
        if r["ratio"] is not None:
            assert r["ratio"] > 0 and all(v > 0 for v in r["medians"].values())
        else:
            assert r["error"]  # Opacus missing or failing is reported, not hidden
    assert {r["method"] for r in records if r["name"] == "zo_step_over_two_forwards"} == {"mezo", "dpzo", "dpzero"}
    # where Opacus ran, our DP step is compared with it directly, from the same medians
    opacus = [r for r in records if r["name"] == "opacus_step_over_nonprivate" and r["ratio"] is not None]
    ours_over_opacus = [r for r in records if r["name"] == "dpsgd_step_over_opacus"]
    assert len(ours_over_opacus) == len(opacus)
    for r in ours_over_opacus:
        assert r["ratio"] == r["medians"]["dpsgd_step"] / r["medians"]["opacus_step"] and r["target"] == 1.0
    assert "zo_step_over_two_forwards" in format_table(records)


def test_cli_writes_bench_json(tmp_path, monkeypatch):
    import dpft.bench.run as bench

    monkeypatch.setattr(bench, "run", lambda quick, device, repeats, *grid: bench_zo("opt-tiny", 2, 8, device, 1))
    out = tmp_path / "bench.json"
    main(["--quick", "--out", str(out), "--device", "cpu", "--repeats", "1"])
    records = json.loads(out.read_text())
    assert records and all(KEYS <= set(r) for r in records)


def test_a_part_of_the_grid_measures_only_its_points(tmp_path):
    """`--only zo --shapes opt-tiny --lengths 8 --batches 2 4`: the ZO records of those two points, nothing else."""
    out = tmp_path / "bench.json"
    main(["--only", "zo", "--shapes", "opt-tiny", "--lengths", "8", "--batches", "2", "4", "--out", str(out),
          "--device", "cpu", "--repeats", "1"])
    records = json.loads(out.read_text())
    assert {(r["model_shape"], r["batch_size"], r["seq_len"]) for r in records} == {("opt-tiny", 2, 8), ("opt-tiny", 4, 8)}
    assert {r["name"] for r in records} == {"zo_step_over_two_forwards", "zo_step_over_mezo_reference",
                                            "zo_seconds_per_step", "zo_peak_memory_over_inference"}
    with pytest.raises(SystemExit):
        main(["--quick", "--shapes", "opt-tiny", "--out", str(out)])


def test_ddp_scaling_record_runs_two_gloo_processes():
    from dpft.bench.run import bench_ddp

    record = bench_ddp("opt-tiny", batch=4, length=8, repeats=1)
    assert record["name"] == "ddp_scaling_efficiency" and record["processes"] == 2
    assert KEYS <= set(record) and record["ratio"] > 0
    assert set(record["medians"]) == {"one_process_step", "2_process_step"}
