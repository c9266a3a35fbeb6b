"""A self-contained HTML page from report blocks: inline CSS, PNGs as base64 data URIs, no scripts.

The page opens offline from a single file (mail it, attach it to an issue).
"""

from __future__ import annotations

import base64
import html
import re
from typing import Sequence

from .blocks import Block

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
td:first-child, th:first-child, td:nth-child(2) { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 .2rem; border-radius: 3px; }
img { max-width: 100%; border: 1px solid #eee; }
footer { color: #888; font-size: .75rem; margin-top: 3rem; }
"""


def inline(text: str) -> str:
    """Escape, then the two bits of inline markdown the report uses: **bold** and `code`."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{inline(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def render_html(blocks: Sequence[Block], title: str = "deltakd report") -> str:
    parts = []
    for b in blocks:
        if b.kind == "h1":
            parts.append(f"<h1>{inline(b.text)}</h1>")
        elif b.kind == "h2":
            parts.append(f"<h2>{inline(b.text)}</h2>")
        elif b.kind == "text":
            parts.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == "list":
            parts.append("<ul>" + "".join(f"<li>{inline(x)}</li>" for x in b.items) + "</ul>")
        elif b.kind == "table":
            parts.append(_table(b.headers, b.rows))
        elif b.kind == "image":
            parts.append(f'<figure><img alt="{html.escape(b.text)}" src="{data_uri(b.png)}"></figure>')
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
            f"<footer>made by deltakd report</footer>\n</body>\n</html>\n")
