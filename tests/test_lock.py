"""The lock (`constraints.txt`, `make lock`): it pins every dependency dpft names but torch, and an install made
with it (`make install`, what CI runs) has exactly those versions."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PINS = {}
for line in (ROOT / "constraints.txt").read_text().splitlines():
    if line and not line.startswith("#"):
        name, _, version = line.partition("==")
        PINS[re.sub(r"[-_.]+", "-", name).lower()] = version


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def test_every_line_is_an_exact_pin():
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line) for line in lines)


def test_every_dependency_but_torch_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = {_name(r) for r in project["dependencies"]}
    named |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    assert named - {"torch"} <= set(PINS), sorted(named - {"torch"} - set(PINS))
    assert "torch" not in PINS  # TORCH_SPEC chooses the build (CPU here, CUDA with TORCH_INDEX)


def test_an_install_made_with_the_lock_has_its_versions():
    marker = Path(sys.prefix) / ".installed"
    if not marker.is_file() or marker.read_text().strip() != "constraints.txt":
        pytest.skip("this environment was not installed with the lock (`make install LOCK=` floats)")
    differ = {}
    for dist in importlib.metadata.distributions():
        name = _name(dist.metadata["Name"])
        if name in PINS and dist.version != PINS[name]:
            differ[name] = (dist.version, PINS[name])
    assert differ == {}
