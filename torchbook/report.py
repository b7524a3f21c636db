"""`report.md`: what a run measured, beside the book's figure, with its data source, time and plots.

A recipe builds a `Report`, adds its comparison rows, tables, text and plots, then writes it. Every report
names its data source and the wall-clock time, so a reader knows what the numbers were measured on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchbook.io import atomic_write_text


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers with sensible precision: 41446 -> '41,446', 0.9123 -> '0.9123', None -> '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


@dataclass
class Comparison:
    """One figure: ours beside the book's (None when the book gives none) and a note."""

    metric: str
    ours: Any
    book: Any = None
    note: str = ""


@dataclass
class Report:
    title: str
    recipe: str
    chapter: str
    data_source: str
    started: float = field(default_factory=time.time)
    comparisons: list[Comparison] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def compare(self, metric: str, ours: Any, book: Any = None, note: str = "") -> Report:
        self.comparisons.append(Comparison(metric, ours, book, note))
        return self

    def text(self, heading: str, body: str) -> Report:
        self.sections.append(f"## {heading}\n\n{body.strip()}\n")
        return self

    def table(self, heading: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Report:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
        self.sections.append(f"## {heading}\n\n" + "\n".join(lines) + "\n")
        return self

    def image(self, heading: str, path: str | Path, run_dir: str | Path) -> Report:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve())
        self.sections.append(f"## {heading}\n\n![{heading}]({rel.as_posix()})\n")
        return self

    def render(self, wall_clock_s: float | None = None) -> str:
        wall = wall_clock_s if wall_clock_s is not None else time.time() - self.started
        out = [
            f"# {self.title}\n",
            f"- recipe: `{self.recipe}` (book chapter {self.chapter})",
            f"- data: {self.data_source}",
            f"- wall-clock time: {wall:.1f} s",
            "",
        ]
        if self.comparisons:
            out += ["## Results beside the book\n", "| metric | ours | book | note |", "|---|---|---|---|"]
            out += [f"| {c.metric} | {fmt(c.ours)} | {fmt(c.book)} | {c.note} |" for c in self.comparisons]
            out.append("")
        out += self.sections
        return "\n".join(out)

    def write(self, run_dir: str | Path, wall_clock_s: float | None = None) -> Path:
        return atomic_write_text(Path(run_dir) / "report.md", self.render(wall_clock_s))
