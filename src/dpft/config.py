"""Where the Hydra configs live: the repository's top-level `conf/` (editable install) or the copy
packed into the wheel as `dpft/conf`; and the resolvers those configs use (registered on import, which
every entry point does before composing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

_PACKAGED = Path(__file__).resolve().parent / "conf"
_REPO = Path(__file__).resolve().parents[2] / "conf"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else _REPO


def coalesce(*values: Any) -> Any:
    """The first value that is set (not null, not empty): `${dpft.coalesce:${table},${task.name}}`."""
    return next((v for v in values if v is not None and v != ""), None)


def flat_tags(*items: Any) -> list[str]:
    """Lists and single values flattened into one list of strings, unset ones dropped (W&B tags)."""
    out: list[str] = []
    for item in items:
        for value in item if isinstance(item, (list, tuple)) or OmegaConf.is_list(item) else [item]:
            if value is not None and value != "" and str(value) not in out:
                out.append(str(value))
    return out


def slurm_gres(gpu_type: str | None, count: int) -> str:
    """Slurm's `--gres` for `count` GPUs, of one type when the cluster names them (gpu:a100:4)."""
    return f"gpu:{gpu_type}:{count}" if gpu_type else f"gpu:{count}"


for _name, _resolver in {"dpft.coalesce": coalesce, "dpft.tags": flat_tags, "dpft.gres": slurm_gres}.items():
    OmegaConf.register_new_resolver(_name, _resolver, replace=True)
