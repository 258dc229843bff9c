"""What a result was computed with: results.json's `environment` block (also in the W&B summary, as
`environment/<key>`), and the signature a report compares before pooling runs into one cell.

Package versions come from `importlib.metadata` (what is installed, whatever `__version__` says); devices are
named as the hardware reports them (every GPU the run used, or the CPU model); `git_dirty` says whether the
working tree differed from `git_commit` when the run started.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# the distributions whose versions can change a table's numbers (opacus: the benchmark's reference)
PACKAGES = ("torch", "lightning", "transformers", "peft", "datasets", "hydra-core", "omegaconf", "dp-accounting",
            "numpy", "scipy", "opacus", "dpft")
# what the report compares between the runs of one cell; threads, the OS and the tree's state change no result
COMPARED = (*PACKAGES, "python", "torch_cuda", "cudnn", "devices")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devices(used: list[str] | None = None) -> str:
    """The devices a run used, by name: `used` as `cuda:0`, `cpu` (results' peak-memory keys)."""
    import torch

    names = []
    for device in used or ["cpu"]:
        if device.startswith("cuda") and torch.cuda.is_available():
            index = int(device.split(":")[1]) if ":" in device else 0
            names.append(torch.cuda.get_device_name(index))
        else:
            names.append(cpu_model())
    return ", ".join(sorted(set(names)))


def _git(*args: str, folder: Path | None = None) -> str | None:
    """git's output in dpft's checkout (or `folder`); None outside a git checkout (an installed wheel)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=folder or Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD")


def git_dirty(folder: Path | None = None) -> bool | None:
    """Whether tracked files differ from the checked-out commit (None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no", folder=folder)
    return None if status is None else bool(status)


def environment(used_devices: list[str] | None = None) -> dict[str, Any]:
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), **package_versions(), "torch_cuda": torch.version.cuda,
            "cudnn": cudnn, "devices": devices(used_devices), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "git_dirty": git_dirty()}


def signature(env: dict[str, Any] | None) -> dict[str, Any]:
    """The part of an environment block that can change results (runs without a block: empty)."""
    return {k: (env or {}).get(k) for k in COMPARED} if env else {}
