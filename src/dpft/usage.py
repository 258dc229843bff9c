"""The help texts of the commands, read from what is on disk: `dpft-train --help` lists the config groups of
`conf/` with their options (and each method's one-line description), `dpft-sweep --help` and `make help` list
the tables of `sweeps/`. Hydra's own help lists every group folder, `local` (a cluster's private settings,
not a choice) included, and cannot say what a method is; `--hydra-help` still shows it."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from dpft.config import CONFIG_DIR

SWEEPS_DIR = CONFIG_DIR.parent / "sweeps"
# the groups a user picks from, in the order a run is composed; the others (hydra, local, paths) are settings
GROUPS = ("model", "task", "method", "privacy", "trainer", "logger", "experiment")
KEY_OVERRIDES = (
    ("seed=0", "the run's seed (initialisation, directions, noise, Poisson batches)"),
    ("task.data_seed=42", "which k-shot split / MeZO sample of the data"),
    ("trainer.max_steps=1000", "training steps (federated methods: fed.rounds)"),
    ("method.lr=1e-6 method.batch_size=16", "the method's hyperparameters (see its conf/method/<name>.yaml)"),
    ("method.clip=1.0", "the clipping bound C of a private method"),
    ("privacy.target_epsilon=2 privacy.target_delta=1e-5", "the budget (privacy=<option> sets both)"),
    ("model.pretrained=/path/to/weights", "a local folder or a Hub id for the model"),
    ("logger=csv | logger=none", "log to CSV files or nowhere (default: W&B, offline)"),
)
OTHER_COMMANDS = (
    ("dpft-sweep <table>", "run a paper's table (sweeps/<table>.yaml), skipping finished cells, and report it"),
    ("dpft-report <folder>", "tables and plots from the results.json files below a folder"),
    ("dpft-audit method=<m>", "an empirical privacy audit of a private method"),
    ("dpft-bench", "speed and memory ratios measured side by side"),
    ("make help", "every make target"),
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def first_comment(path: Path) -> str:
    """The first sentence of a config file's leading comment ('' when it has none)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("# @package"):
            break
        lines.append(line.lstrip("# ").rstrip())
    sentence = re.split(r"(?<!\bal)(?<!e\.g)\.\s", " ".join(lines) + " ", maxsplit=1)[0].strip()
    return textwrap.shorten(sentence, 150, placeholder=" …")


def _rows(pairs, width: int = 100) -> list[str]:
    pad = max(len(a) for a, _ in pairs) + 2
    out = []
    for left, right in pairs:
        wrapped = textwrap.wrap(right, width - pad - 2) or [""]
        out.append(f"  {left.ljust(pad)}{wrapped[0]}")
        out += [" " * (pad + 2) + more for more in wrapped[1:]]
    return out


def train_help() -> str:
    lines = ["dpft-train: fine-tune one model on one task with one method, privately or not; test it and write",
             "results.json in the run folder (printed at the end).",
             "",
             "usage: dpft-train [group=option ...] [key=value ...]",
             "       dpft-train --multirun method=ft,mezo seed=0,1,2 ...   a sweep, one job per combination",
             "       dpft-train ... --cfg job                             print the composed config, run nothing",
             "",
             "Groups (group=option; the default in brackets):"]
    defaults = _defaults()
    for group in GROUPS:
        names = [f"[{n}]" if defaults.get(group) == n else n for n in options(group)]
        lines += [f"  {group}:"] + textwrap.wrap(", ".join(names), 96, initial_indent="    ",
                                                  subsequent_indent="    ")
    lines += ["", "Methods:"]
    lines += _rows([(n, first_comment(CONFIG_DIR / "method" / f"{n}.yaml")) for n in options("method")])
    lines += ["", "Key overrides (any key of the composed config can be set):"]
    lines += _rows(KEY_OVERRIDES)
    lines += ["", "Other commands:"]
    lines += _rows(OTHER_COMMANDS)
    lines += ["", "Hydra's own flags: dpft-train --hydra-help. Documentation: README.md and docs/."]
    return "\n".join(lines)


def _defaults() -> dict[str, str]:
    """group -> option of train.yaml's defaults list (read as text: composing would need Hydra)."""
    found = {}
    for line in (CONFIG_DIR / "train.yaml").read_text().splitlines():
        m = re.match(r"\s*-\s*(?:override\s+)?(\w+)\s*:\s*([\w.\-]+)", line)
        if m and m.group(1) in GROUPS:
            found[m.group(1)] = m.group(2)
    return found


def tables() -> list[tuple[str, str]]:
    """(name, description) of every sweep file."""
    from omegaconf import OmegaConf

    return [(p.stem, str(OmegaConf.load(p).get("description", ""))) for p in sorted(SWEEPS_DIR.glob("*.yaml"))]


def tables_help() -> str:
    return "tables (sweeps/<name>.yaml):\n" + "\n".join(_rows(tables()))
