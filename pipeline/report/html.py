"""A self-contained HTML report: inline CSS, PNGs embedded as base64 data URIs.

:func:`markdown_to_html` is a deliberately small converter for the markdown this pipeline
writes: ATX headings, GitHub pipe tables (with ``:---`` / ``---:`` / ``:---:`` alignment and
``\\|`` escapes), bullet lists, ``>`` quoted banners, fenced code blocks, images ``![alt](src)``
and paragraphs; inline ``**bold**``, ``*italic*``, ```code``` and ``[text](url)``. All text is escaped with
:func:`html.escape`; nothing in the input becomes raw HTML.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Mapping, Sequence

CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}h2{border-bottom:1px solid #eee;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px}pre{background:#f6f8fa;padding:.8em;overflow:auto}
figure{margin:1.2em 0}figure img,p img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.missing{color:#b00}
blockquote{margin:1em 0;padding:.6em 1em;background:#fff6d6;border-left:4px solid #e0a800}
""".strip()

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_IMAGE_LINE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)\s*$")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_LIST_ITEM = re.compile(r"^\s*[-*+]\s+(.*)$")
_QUOTE = re.compile(r"^\s*>\s?(.*)$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def png_data_uri(path) -> str:
    """``data:image/png;base64,...`` of a PNG file (``FileNotFoundError`` naming it if missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report image missing: {path}")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _safe_url(url: str) -> str:
    """An (already escaped) link target; script-like schemes become ``#``."""
    return "#" if re.match(r"^\s*(javascript|vbscript|data):", url, re.I) else url


def _inline(text: str) -> str:
    """Escape ``text`` and apply the inline markup (code spans are left untouched)."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2 == 1:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part)
        s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{_safe_url(m.group(2))}">{m.group(1)}</a>', s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s)
        out.append(s)
    return "".join(out)


def _cells(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(s)]


def _align(sep: str) -> str:
    sep = sep.strip()
    if sep.startswith(":") and sep.endswith(":"):
        return "center"
    if sep.endswith(":"):
        return "right"
    return "left"


def _table(header: str, sep: str, rows: list[str]) -> str:
    heads = _cells(header)
    aligns = [_align(s) for s in _cells(sep)]
    aligns += ["left"] * (len(heads) - len(aligns))
    out = ["<table>", "<thead><tr>"]
    out += [f'<th style="text-align:{a}">{_inline(h)}</th>' for h, a in zip(heads, aligns)]
    out.append("</tr></thead>")
    out.append("<tbody>")
    for r in rows:
        cells = _cells(r)
        cells = (cells + [""] * len(heads))[: len(heads)]
        out.append("<tr>" + "".join(f'<td style="text-align:{a}">{_inline(c)}</td>'
                                    for c, a in zip(cells, aligns)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _resolve_image(alt: str, src: str, images: Mapping[str, Path] | None):
    """The key and file of ``images`` meant by an ``![alt](src)`` line: a key equal to the alt
    text or to src, else a file whose name equals src's file name."""
    if not images:
        return None
    for key in (alt, src):
        if key in images:
            return key, Path(images[key])
    name = Path(src).name
    for key, p in images.items():
        if Path(p).name == name:
            return key, Path(p)
    return None


def _figure(caption: str, path: Path) -> str:
    return (f'<figure><img alt="{html.escape(caption)}" src="{png_data_uri(path)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def markdown_to_html(md: str, images: Mapping[str, Path] | None = None, _used: set | None = None) -> str:
    """Convert pipeline markdown to an HTML fragment (see the module docstring).

    An image line ``![alt](src)`` whose alt or src is a key of ``images`` (or whose file name
    matches one of them) is embedded as a base64 PNG; any other image becomes a visible
    "missing figure" note, so the page never links to a file outside itself.
    """
    lines = md.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    para: list[str] = []

    def flush_para():
        if para:
            out.append("<p>" + " ".join(_inline(p.strip()) for p in para) + "</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush_para()
            i += 1
            continue
        if line.strip().startswith("```"):
            flush_para()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        m = _HEADING.match(line)
        if m:
            flush_para()
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1]) and "|" in lines[i + 1]:
            flush_para()
            j = i + 2
            while j < len(lines) and lines[j].strip() and "|" in lines[j]:
                j += 1
            out.append(_table(line, lines[i + 1], lines[i + 2:j]))
            i = j
            continue
        m = _IMAGE_LINE.match(line.strip())
        if m:
            flush_para()
            alt, src = m.group(1), m.group(2)
            found = _resolve_image(alt, src, images)
            if found is None:
                out.append(f'<p class="missing">figure not embedded: {html.escape(alt)} ({html.escape(src)})</p>')
            else:
                key, path = found
                out.append(_figure(alt or key, path))
                if _used is not None:
                    _used.add(key)
            i += 1
            continue
        if _QUOTE.match(line):
            flush_para()
            quoted = []
            while i < len(lines) and _QUOTE.match(lines[i]):
                quoted.append(_QUOTE.match(lines[i]).group(1))
                i += 1
            out.append("<blockquote>" + markdown_to_html("\n".join(quoted), images, _used) + "</blockquote>")
            continue
        if _LIST_ITEM.match(line):
            flush_para()
            items = []
            while i < len(lines) and _LIST_ITEM.match(lines[i]):
                items.append("<li>" + _inline(_LIST_ITEM.match(lines[i]).group(1)) + "</li>")
                i += 1
            out.append("<ul>\n" + "\n".join(items) + "\n</ul>")
            continue
        para.append(line)
        i += 1
    flush_para()
    return "\n".join(out)


def render_html(title: str, sections: Sequence[tuple[str, str]], images: Mapping[str, Path] | None = None) -> str:
    """A complete HTML page: ``<h1>title</h1>``, then one ``<section>`` per ``(heading, markdown)``
    (an empty heading adds none) and, last, a "Figures" section with every image of ``images``
    (caption -> PNG path) not already placed by an ``![caption](...)`` line in a section.
    Every PNG is embedded as a data URI; a missing file raises ``FileNotFoundError``."""
    images = {str(k): Path(v) for k, v in (images or {}).items()}
    for p in images.values():
        if not p.is_file():
            raise FileNotFoundError(f"report image missing: {p}")
    used: set = set()
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, md in sections:
        parts = ["<section>"]
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(markdown_to_html(md, images, used))
        parts.append("</section>")
        body.append("\n".join(parts))
    rest = [k for k in images if k not in used]
    if rest:
        body.append("<section>\n<h2>Figures</h2>\n" + "\n".join(_figure(k, images[k]) for k in rest) + "\n</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
