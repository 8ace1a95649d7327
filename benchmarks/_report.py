"""The benchmark tools' shared writer: each owns a section of a Markdown file (by default
``docs/BENCHMARKS.md``), between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, and rewrites
only that (atomically), saying the command that produced it."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "docs", "BENCHMARKS.md")


def command(module: str, argv=None) -> str:
    """The command line that ran ``module`` with ``argv`` (default: this process's arguments)."""
    return " ".join(["python -m " + module, *(sys.argv[1:] if argv is None else argv)])


def write_section(path: str, name: str, body: str) -> None:
    """Replace the ``name`` section of ``path`` with ``body`` (appended if the file has none)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)


def table(header, rows) -> list[str]:
    """A Markdown table's lines: ``header`` (column names) and ``rows`` (lists of cells)."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + " --- |" * len(header)] + [line(r) for r in rows]
