"""Fill the measured tables of docs/*.md from committed result files (`make docs`; tests/test_docs.py checks the
pages are current). Figures in the docs are never typed by hand:

    <!-- bench-table: docs/bench/quick-cpu.json -->     a `dpft-bench` records file, as `dpft-bench` prints it
    <!-- end bench-table -->
    <!-- report-table: docs/results/cpu/table.md -->    a `dpft-report` table, included as written
    <!-- end report-table -->

Paths are relative to the repository root. A block whose file is not committed yet says so.

    python tools/render_docs.py [PAGE ...]   # default: every page of docs/ and the README
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- (bench|report)-table: (\S+) -->\n)(.*?)(<!-- end \2-table -->)", re.S)


def bench_table(path: Path) -> str:
    from dpft.bench.run import format_table

    records = json.loads(path.read_text())
    environments = {json.dumps(r.get("environment", {}), sort_keys=True) for r in records}
    lines = [format_table(records), ""]
    for env in sorted(environments):
        e = json.loads(env)
        lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in e.items()) + ".")
    return "\n".join(lines)


def render(text: str, root: Path = ROOT) -> str:
    def fill(match: re.Match) -> str:
        start, kind, rel, _, end = match.groups()
        path = root / rel
        if not path.is_file():
            body = f"*Not measured yet: `{rel}` is not committed.*"
        elif kind == "bench":
            body = bench_table(path)
        else:
            body = path.read_text().strip()
        return f"{start}{body}\n{end}"

    return BLOCK.sub(fill, text)


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="*", type=Path, help="pages to fill (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    for page in args.pages or pages():
        text = page.read_text()
        new = render(text)
        if new != text:
            page.write_text(new)
            print(f"rendered {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
