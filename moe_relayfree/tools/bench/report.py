"""Writing a benchmark's report: ``<stem>.json`` (everything) and ``<stem>.md`` (the tables)."""

from __future__ import annotations

import json
import os
from typing import Sequence


def write(out: str, stem: str, report: dict, markdown: str) -> list[str]:
    """Writes ``out/stem.json`` and ``out/stem.md``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{stem}.json"), os.path.join(out, f"{stem}.md")]
    with open(paths[0], "w") as fh:
        json.dump(report, fh, indent=1, default=float)
    with open(paths[1], "w") as fh:
        fh.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A markdown table's lines (cells as given, ``str()`` of each)."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
