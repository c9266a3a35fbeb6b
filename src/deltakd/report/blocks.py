"""Report pages as a list of blocks (headings, text, lists, tables, images) and their markdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .format import markdown_table


@dataclass
class Block:
    """One piece of a report page, rendered to both markdown and HTML."""

    kind: str  # "h1" | "h2" | "text" | "list" | "table" | "image"
    text: str = ""
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    png: bytes = b""
    file: str = ""  # the image's file name next to report.md


def blocks_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "text":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {x}" for x in b.items))
        elif b.kind == "table":
            out.append(markdown_table(b.headers, b.rows))
        elif b.kind == "image":
            out.append(f"![{b.text}]({b.file})")
    return "\n\n".join(out) + "\n"

