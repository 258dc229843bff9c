"""Mutation testing of the privacy-critical code with mutmut 3 (`make mutants`, docs/testing.md).

    python tools/mutants.py run [--jobs N] [FILE ...]   # mutate SCOPE (or these files of it), score it
    python tools/mutants.py run FILE --only NAME ...      # run some mutants again (e.g. survivors after new tests)
    python tools/mutants.py show NAME                    # any other mutmut command, with the same configuration
    python tools/mutants.py browse

Each module of SCOPE has its own tests. The modules that share a test selection are run together by one
`mutmut run`: mutmut first runs those tests once to record which test calls which function, then runs, against
each mutant, only the selected tests that call the mutated function (forked from a server that has imported them,
so a mutant costs its tests' time). Every invocation reruns every mutant it names. The score per module and
the survivors are printed and merged into mutants/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from glob import glob
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = Path("mutants") / "summary.json"
LOG = Path("mutants") / "run.log"  # mutmut's own output
# the privacy matrix's claims (tests/privacy_matrix/test_<claim>.py) a module's mutants run against. The claims
# that train every method for real (sampling, charging, secure mode: tens of seconds per mutant) are left to `make
# test`; the unit tests of each module cover the same code paths.
def matrix(*claims: str) -> tuple[str, ...]:
    return tuple(f"tests/privacy_matrix/test_{claim}.py" for claim in claims)




@dataclass(frozen=True)
class Module:
    path: str
    tests: tuple[str, ...]  # test files, directories or node ids (file::test); glob patterns allowed in the file part
    functions: tuple[str, ...] = ("*",)  # mutmut's function names to mutate: `x_func`, `xǁClassǁmethod`; globs

    @property
    def dotted(self) -> str:
        return self.path.removeprefix("src/").removesuffix(".py").replace("/", ".")

    def globs(self) -> list[str]:
        """mutmut mutant-name patterns of the mutants of this module's scope."""
        return [f"{self.dotted}.{f}__mutmut_*" for f in self.functions]

    def owns(self, mutant: str) -> bool:
        return any(fnmatch.fnmatchcase(mutant, g) for g in self.globs())


def _dp(cls: str, *methods: str) -> tuple[str, ...]:
    return tuple(f"xǁ{cls}ǁ{m}" for m in methods)


# the conventions' accounting without their real runs (and without the DPZero comparison: 13 s of calibration)
CONVENTIONS = tuple(f"tests/test_privacy_convention.py::test_{name}" for name in (
    "replace_one_pld_counts_twice_the_bound", "paper_convention_spends_the_replace_one_epsilon_of_its_own_noise",
    "what_the_paper_convention_has_no_analysis_for_is_refused", "a_local_statement_is_replace_one_without_amplification",
    "runs_of_different_conventions_are_not_composed_and_paper_runs_compose_replace_one",
    "a_checkpoint_from_before_the_convention_resumes_and_a_changed_convention_does_not"))
ACCOUNTING = ("tests/test_privacy_accounting.py", *CONVENTIONS, *matrix("accounting"))
SCOPE: tuple[Module, ...] = (
    Module("src/dpft/privacy/accounting.py", ACCOUNTING),
    Module("src/dpft/privacy/ledger.py", ACCOUNTING),
    Module("src/dpft/privacy/audit.py", ("tests/test_privacy_audit.py",)),
    Module("src/dpft/privacy/noise.py", (
        "tests/test_dp_first_order.py::test_noise_drawn_in_chunks_over_threads_is_calibrated_independent_and_reproducible",
        "tests/test_dp_first_order.py::test_empirical_noise_std_matches_sigma_c",
        "tests/test_resume.py::test_secure_noise_has_the_calibrated_std_and_no_reproducible_state",
        "tests/test_noise.py", "tests/test_private_zo.py", *matrix("noise"))),
    Module("src/dpft/privacy/per_example.py", ("tests/test_per_example.py", "tests/test_dp_first_order.py",
                                               "tests/test_example_clipping.py",
                                               *matrix("clipping", "nonfinite"))),
    Module("src/dpft/data/sampling.py", (
        "tests/test_sampling.py", "tests/test_private_zo.py::test_poisson_sampler_inclusion_rate_and_empty_batches")),
    Module("src/dpft/validation.py", (
        "tests/test_validation.py",
        "tests/test_privacy_claims.py::test_laplace_is_refused_before_data_for_l2_clipped_methods",
        "tests/test_privacy_claims.py::test_delta_not_below_one_over_n_is_refused_before_the_model",
        *matrix("refusals")),
           # the checks a privacy statement rests on; validate_config's ranges of lr, batch size, lengths are not
           ("x__check", "x__number", "x__int", "x_check_precision", "x_trains", "x_check_per_example_layers",
            "x_check_devices", "x_federated_checks", "x_validate_privacy", "x_check_privacy_pair", "x_method_class",
            "x_check_delta")),
    # methods/: the parts that clip, noise, count steps or decide what a private run releases
    Module("src/dpft/methods/base.py", (
        "tests/test_method_base.py",
        "tests/test_privacy_claims.py::test_laplace_is_refused_before_data_for_l2_clipped_methods",
        "tests/test_privacy_claims.py::test_a_private_run_releases_no_raw_statistics_unless_asked",
        "tests/test_privacy_claims.py::test_diagnostics_are_released_only_on_request_and_listed",
        "tests/privacy_matrix/test_charging.py::test_raw_statistics_are_released_only_with_diagnostics",
        *matrix("refusals")),
           ("xǁMethodModuleǁcheck_mechanism", "xǁMethodModuleǁlog_raw", "xǁMethodModuleǁprivacy_block")),
    Module("src/dpft/methods/zeroth_order.py", ("tests/test_private_zo.py",
                                                 *matrix("clipping", "noise", "nonfinite", "steps")),
           _dp("PrivateEstimator", "*") + _dp("ZerothOrder", "setup", "configure_optimizers", "training_step",
                                              "privacy_block", "raw_statistics")),
    Module("src/dpft/methods/dp_first_order.py", (
        "tests/test_dp_first_order.py",
        "tests/test_example_clipping.py::test_training_with_multi_token_label_words_clips_one_norm_per_example",
        *matrix("clipping", "noise", "nonfinite", "steps")),
           _dp("DPOptimizer", "*") + _dp("AdaptiveNoiseDPOptimizer", "*")
           + _dp("DPFirstOrder", "configure_optimizers", "training_step", "on_fit_start", "privacy_block",
                 "raw_statistics")),
    Module("src/dpft/methods/federated.py", (
        "tests/test_federated.py::test_a_round_without_noise_or_encoder_equals_fedavg_by_hand",
        "tests/test_federated.py::test_client_statistics_have_sensitivity_c_and_invert_to_the_moments",
        "tests/test_federated.py::test_fedavg_and_dp_fedavg_run_and_report_communication",
        "tests/test_federated.py::test_upload_bytes_match_the_codes_actually_sent",
        *matrix("clipping", "noise", "nonfinite", "steps")),
           ("x_flat_norm", "x_clip_update", "x_client_statistics")
           + _dp("FederatedLoRA", "aggregate", "noise_like", "training_step", "privacy_block", "raw_statistics")),
)


def resolve(patterns: tuple[str, ...]) -> list[str]:
    """The test selection: each pattern's existing files (or node ids on them), in order, without duplicates."""
    out: list[str] = []
    for pattern in patterns:
        path, sep, node = pattern.partition("::")
        for hit in sorted(glob(path)) if any(c in path for c in "*?[") else [path] if Path(path).exists() else []:
            item = hit + sep + node
            if item not in out:
                out.append(item)
    return out


def configure(tests: list[str]) -> None:
    """mutmut's configuration: pyproject's [tool.mutmut], every SCOPE module mutated, these tests selected."""
    import mutmut.configuration as mc

    mc._config = dataclasses.replace(mc._load_config(), only_mutate=sorted({m.path for m in SCOPE}),
                                     pytest_add_cli_args_test_selection=tests)


# a string literal (not an f-string, whose {fields} are code); mutmut changes one to XX…XX, lower or upper case
LITERAL = re.compile(r"""(?<![\w"'])([rRbBuU]{0,2})("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


def prose_only(diff: str) -> bool:
    """Whether a mutant only rewrites the text of a message or description: a string literal with a space in it
    (dict keys, modes and file names have none). Such text is no privacy claim, so these mutants are not run."""
    lines = [line for line in diff.splitlines() if line[:1] in "-+" and line[:3] not in ("---", "+++")]
    minus, plus = [line[1:] for line in lines if line[0] == "-"], [line[1:] for line in lines if line[0] == "+"]
    if not minus or len(minus) != len(plus):
        return False
    for old, new in zip(minus, plus):
        if LITERAL.sub('""', old) != LITERAL.sub('""', new):
            return False  # code changed, or an f-string
        changed = [a for a, b in zip(LITERAL.findall(old), LITERAL.findall(new)) if a != b]
        if not all(" " in text for _, text in changed):
            return False
    return True


def mutmut(args: list[str], tests: list[str]) -> None:
    configure(tests)
    import mutmut.__main__ as main
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.state import state
    from mutmut.workers.isolation import ForkServerRunner

    collect, submit, register, started = (main.collect_source_file_mutation_data, ForkServerRunner.submit,
                                          main._register_mutant_result, {})

    def without_prose(*, mutant_names):
        mutants, by_path = collect(mutant_names=mutant_names)
        kept, skipped = [], set()
        for data, name, result in mutants:
            if prose_only(get_diff_for_mutant(name, path=data.path)):
                data.exit_code_by_key[name] = 34  # mutmut's "skipped"
                skipped.add(data)
            else:
                kept.append((data, name, result))
        for data in skipped:
            data.save()
        return kept, by_path

    def fastest_first(self, mutant_name, tests, *args):
        started[mutant_name] = time.monotonic()
        return submit(self, mutant_name, sorted(tests, key=lambda t: state().duration_by_test.get(t, 0.0)), *args)

    def timed(result, by_name):  # mutmut's fork server reports no durations: time from submission, one worker
        if result.mutant_name in started:
            result = dataclasses.replace(result, duration=time.monotonic() - started.pop(result.mutant_name))
        return register(result, by_name)

    main.collect_source_file_mutation_data, ForkServerRunner.submit = without_prose, fastest_first
    main._register_mutant_result = timed
    main.cli(args, prog_name="mutmut")


def outcomes(modules: list[Module]) -> dict[str, dict]:
    """Status and seconds of these modules' mutants, from mutmut's per-file records."""
    from mutmut.stats import status_by_exit_code

    out = {}
    for module in modules:
        meta = Path("mutants") / (module.path + ".meta")
        if not meta.is_file():
            continue
        data = json.loads(meta.read_text())
        for name, code in data["exit_code_by_key"].items():
            if module.owns(name):
                out[name] = {"module": module.path, "status": status_by_exit_code[code],
                             "seconds": data["durations_by_key"].get(name)}
    return out


def report(modules: list[Module], results: dict[str, dict]) -> None:
    print(f"\n{'module':36} {'mutants':>7} {'prose':>5} {'run':>5} {'killed':>6} {'timeout':>7} {'survived':>8} "
          f"{'no test':>7} {'other':>5} {'score':>6} {'s/mutant':>8}")
    survivors = []
    for module in modules:
        mine = {k: v for k, v in results.items() if v["module"] == module.path}
        count = {s: sum(v["status"] == s for v in mine.values())
                 for s in ("killed", "timeout", "survived", "no tests", "skipped")}
        run = len(mine) - count["skipped"]
        killed = count["killed"] + count["timeout"]  # a mutant that hangs the tests is caught too
        other = run - killed - count["survived"] - count["no tests"]
        seconds = [v["seconds"] for v in mine.values() if v["status"] != "skipped" and v["seconds"]]
        score = f"{100 * killed / run:.1f}%" if run else "-"
        per = f"{sum(seconds) / len(seconds):.2f}" if seconds else "-"
        print(f"{module.path.removeprefix('src/dpft/'):36} {len(mine):7} {count['skipped']:5} {run:5} "
              f"{count['killed']:6} {count['timeout']:7} {count['survived']:8} {count['no tests']:7} {other:5} "
              f"{score:>6} {per:>8}")
        survivors += [(k, v["status"]) for k, v in sorted(mine.items())
                      if v["status"] not in ("killed", "timeout", "skipped")]
    print("\nprose: mutants that only change the text of a message or description, not run; score: (killed + timed "
          "out) / run")
    if survivors:
        print("not killed (`python tools/mutants.py show NAME` prints the mutation):")
        for name, status in survivors:
            print(f"  {status:12} {name}")


def run(files: list[str], jobs: int, only: list[str] | None = None) -> int:
    scope = list(SCOPE)
    if files:  # e.g. FILES="$(git diff --name-only main)": what is outside the scope is left out
        outside = [f for f in files if not any(fnmatch.fnmatch(m.path, f) for m in SCOPE)]
        if outside:
            print(f"not in the mutation scope, left out: {' '.join(outside)}")
        scope = [m for m in SCOPE if any(fnmatch.fnmatch(m.path, f) for f in files)]
        if not scope:
            print("nothing to mutate; the scope is:\n  " + "\n  ".join(m.path for m in SCOPE))
            return 0
    groups: dict[tuple[str, ...], list[Module]] = {}
    for module in scope:
        groups.setdefault(tuple(resolve(module.tests)), []).append(module)
    Path("mutants").mkdir(exist_ok=True)
    LOG.write_text("")
    results = json.loads(SUMMARY.read_text()) if SUMMARY.is_file() else {}
    start, code = time.time(), 0
    for tests, modules in groups.items():
        if not tests:
            sys.exit(f"no test file of {[m.path for m in modules]} exists")
        names = [g for m in modules for g in m.globs()]
        if only:  # some mutants again (e.g. the survivors, after adding tests): names or globs of the scope
            names = [n for n in only if any(fnmatch.fnmatchcase(n, g) or fnmatch.fnmatchcase(g, n)
                                            for m in modules for g in m.globs())]
            if not names:
                continue
        began = time.time()
        print(f"{', '.join(m.path for m in modules)} against {len(tests)} test selection(s) ...", end=" ", flush=True)
        Path("mutants/mutmut-stats.json").unlink(missing_ok=True)  # map tests to functions afresh
        args = [sys.executable, __file__, "--tests", json.dumps(list(tests)), "run", "--max-children", str(jobs), *names]
        with open(LOG, "a") as log:
            status = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT)
        results = {k: v for k, v in results.items() if not any(m.owns(k) for m in modules)}
        results.update(outcomes(modules))
        SUMMARY.write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"{time.time() - began:.0f} s" + (f" (mutmut exited {status}: see {LOG})" if status else ""), flush=True)
        code = code or status
    print(f"wall time {time.time() - start:.0f} s, {jobs} worker(s); mutmut's output: {LOG}")
    report(scope, results)
    return code


def main() -> None:
    os.chdir(ROOT)
    shared = ROOT.parent / "shared" / "data"  # the local data mirror beside the checkout, as in tests/conftest.py
    if not os.environ.get("DPFT_DATA_DIR") and shared.is_dir():
        os.environ["DPFT_DATA_DIR"] = str(shared)
    argv = sys.argv[1:]
    if argv[:1] == ["--tests"]:  # one `mutmut run` (or another command) for one test selection
        mutmut(argv[2:], json.loads(argv[1]))
        return
    if argv[:1] == ["run"]:
        parser = argparse.ArgumentParser(prog="tools/mutants.py run")
        parser.add_argument("files", nargs="*", help="modules of the scope to mutate (default: all of it)")
        parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
        parser.add_argument("--only", nargs="+", metavar="NAME", help="mutant names or globs to run again; the rest "
                            "keep their last result, except a function's changed since: name those too (fn__mutmut_*)")
        opts = parser.parse_args(argv[1:])
        sys.exit(run(opts.files, opts.jobs, opts.only))
    mutmut(argv, resolve(tuple(t for m in SCOPE for t in m.tests)))


if __name__ == "__main__":
    main()
