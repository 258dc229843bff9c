"""The commands' help: `dpft-train --help` lists what a user can choose (not Hydra's stock text), `dpft-sweep
--help` and `make help` list the tables, and every flag of every `dpft-*` command says what it does."""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from dpft.config import CONFIG_DIR
from dpft.usage import first_comment, options, tables, train_help

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_train_help_lists_every_option_of_every_group_and_no_settings_group():
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv=['dpft-train','--help']; "
                          "from dpft.train import main; main()"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "powered by Hydra" not in text and text.strip() == train_help().strip()
    for group in ("model", "task", "method", "privacy", "trainer", "logger"):
        names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        assert names and options(group) == names
        assert all(name in text for name in names), group
    assert "local:" not in text and "example" not in text.split("Methods:")[0]
    assert "[ft]" in text and "[sst2-k512]" in text and "[none]" in text  # train.yaml's defaults, marked
    for method in options("method"):  # each method with its description
        line = next(line for line in text.splitlines() if line.startswith(f"  {method} "))
        assert len(line.split(None, 1)[1]) > 10, line
    assert "dpft-sweep" in text and "dpft-report" in text and "dpft-audit" in text


def test_first_comment_keeps_citations_whole(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("# DPZero (Zhang et al. 2024): clips the scalar, e.g. to C. Second sentence.\n# more\nlr: 1\n")
    assert first_comment(f) == "DPZero (Zhang et al. 2024): clips the scalar, e.g. to C"
    f.write_text("lr: 1\n")
    assert first_comment(f) == ""


def test_sweep_help_and_make_help_list_every_table():
    names = [name for name, _ in tables()]
    assert names == sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")) and "cpu" in names
    assert all(description for _, description in tables())
    out = subprocess.run([sys.executable, "-m", "dpft.report.run_table", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and all(name in out.stdout for name in names)
    if shutil.which("make"):
        made = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0
        listed = made.stdout.split("tables (")[1]
        for name, description in tables():
            assert f"  {name} " in listed and description[:40] in listed


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_flag_has_help(script, monkeypatch):
    """Every argument of every `dpft-*` command that argparse parses carries help text (`dpft-train` takes
    Hydra overrides, whose help is the test above)."""
    module, _, func = SCRIPTS[script].partition(":")
    if module == "dpft.train":
        pytest.skip("Hydra's command line: tested above")
    added: list[tuple[tuple, dict]] = []
    original = argparse.ArgumentParser.add_argument

    def recording(self, *args, **kwargs):
        if not any(a in ("-h", "--help") for a in args):
            added.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", recording)
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), func)(["--help"])
    assert exit_.value.code in (0, None)
    assert added, script
    missing = [args for args, kwargs in added if not kwargs.get("help")]
    assert not missing, f"{script}: no help for {missing}"
