"""The benchmark tools' shared writer: each owns a section of a Markdown file, between
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, and rewrites only that (atomically)."""
from __future__ import annotations

import os


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
