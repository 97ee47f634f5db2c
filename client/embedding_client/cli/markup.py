"""Word and HTML files as plain text that keeps their structure for the chunker.

Headings become Markdown `#` lines, list items `- ` lines and table rows `a | b` lines;
blocks are separated by blank lines, which is where the server's chunker prefers to cut.
HTML loses its scripts, styles, navigation and everything else a reader never sees.

Each library is imported when a file of its kind is read: they are optional extras
([docx]: python-docx, [html]: beautifulsoup4), and an ImportError names the missing one.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bs4.element import Tag
    from docx.table import Table
    from docx.text.paragraph import Paragraph

# Word's built-in heading styles ("Heading 1".."Heading 9"; python-docx gives the English
# names whatever the document's language) and its title.
_WORD_HEADING = re.compile(r"Heading ([1-9])")
_WORD_TITLE = "Title"

# Elements whose content is not text a reader sees (<head> holds only metadata and styles).
_HTML_DROPPED = (
    "head", "script", "style", "noscript", "template", "nav", "svg", "canvas", "iframe",
    "object", "embed",
)  # fmt: skip
_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}
# Elements that start and end a block; anything else is inline and joins the text around it.
_HTML_BLOCKS = frozenset((
    "address", "article", "aside", "blockquote", "body", "dd", "details", "dialog", "div",
    "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "html",
    "main", "ol", "p", "section", "summary", "table", "tbody", "thead", "tfoot", "ul",
))  # fmt: skip


def _blocks(blocks: Iterable[str]) -> str:
    return "\n\n".join(block for block in blocks if block)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _heading(level: int, text: str) -> str:
    return f"{'#' * level} {text}"


# ------------------------------------------------------------------------------- Word


def docx_text(path: Path) -> str:
    """The body of a .docx in document order: paragraphs, headings, lists and tables."""
    import docx
    from docx.text.paragraph import Paragraph

    document = docx.Document(str(path))
    return _blocks(
        _word_paragraph(block) if isinstance(block, Paragraph) else _word_table(block)
        for block in document.iter_inner_content()
    )


def _word_paragraph(paragraph: Paragraph) -> str:
    text = paragraph.text.strip()
    style = paragraph.style.name if paragraph.style is not None else None
    if not text or not style:
        return text
    heading = _WORD_HEADING.fullmatch(style)
    if heading:
        return _heading(int(heading.group(1)), text)
    if style == _WORD_TITLE:
        return _heading(1, text)
    if style.startswith("List"):
        return f"- {text}"
    return text


def _word_table(table: Table) -> str:
    lines = []
    for row in table.rows:
        # A merged cell is listed once per grid column it spans: keep it once.
        cells = [text for text, _ in itertools.groupby(c.text.strip() for c in row.cells)]
        line = " | ".join(cell for cell in cells if cell)
        if line:
            lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------- HTML


def html_text(data: bytes) -> str:
    """The visible text of an HTML page (its encoding found as a browser would)."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")  # the stdlib parser: no C library needed
    for hidden in soup.find_all(_HTML_DROPPED):
        hidden.decompose()
    out = _HtmlBlocks()
    out.walk(soup.body or soup)
    out.flush()
    return _blocks(out.blocks)


class _HtmlBlocks:
    """Walks the tree, gathering inline text into the current block."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self._inline: list[str] = []
        self._prefix = ""  # "- " while a list item's first block is pending

    def add(self, block: str) -> None:
        self.flush()
        if block:
            self.blocks.append(self._prefix + block)
            self._prefix = ""

    def flush(self) -> None:
        text = _collapse("".join(self._inline))
        self._inline.clear()
        if text:
            self.blocks.append(self._prefix + text)
            self._prefix = ""

    def walk(self, node: Tag) -> None:
        from bs4.element import NavigableString, PreformattedString, Tag

        for child in node.children:
            if isinstance(child, PreformattedString):  # comments, doctypes, CDATA
                continue
            if isinstance(child, NavigableString):
                self._inline.append(str(child))
                continue
            if not isinstance(child, Tag):
                continue
            name = child.name
            if name in _HTML_HEADINGS:
                self.add(_heading(_HTML_HEADINGS[name], _collapse(child.get_text(" "))))
            elif name == "pre":
                self.add(child.get_text().strip("\n"))
            elif name == "tr":
                row = child.find_all(["td", "th"], recursive=False)
                cells = (_collapse(cell.get_text(" ")) for cell in row)
                self.add(" | ".join(cell for cell in cells if cell))
            elif name == "br":
                self.flush()
            elif name == "li":
                self.flush()
                self._prefix = "- "
                self.walk(child)
                self.flush()
            elif name in _HTML_BLOCKS:
                self.flush()
                self.walk(child)
                self.flush()
            else:
                self.walk(child)
