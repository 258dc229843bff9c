"""Where the Hydra configs live: the repository's top-level `conf/` (editable install) or the copy
packed into the wheel as `dpft/conf`."""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "conf"
_REPO = Path(__file__).resolve().parents[2] / "conf"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else _REPO
