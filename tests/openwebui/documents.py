"""The knowledge base a user would build: five real documents and questions about them.

No download is possible, so the documents are real texts that the pinned Open WebUI venv
always holds (package docs and licence texts), copied into the test's tmp dir at run time
(none is committed). The PDF is typeset at run time from one of them with matplotlib (a dev
dependency) in a standard PDF core font, so Open WebUI's default loader (pypdf) can
extract its text.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Document:
    name: str  # the file name uploaded, which says its kind (.md, .txt, .pdf)
    source: str  # path inside the Open WebUI venv's site-packages (a glob for dist-info)
    what: str


@dataclass(frozen=True)
class Question:
    text: str
    document: str  # the name of the one document that answers it
    answer: str  # words of the passage that answers it (case and spacing aside)


DOCUMENTS = [
    # Markdown, about 5,400 words, code-heavy: chunks of 1,000 characters run far past
    # MiniLM's 256-token window.
    Document(
        "langsmith-sandbox-README.md", "langsmith/sandbox/README.md", "LangSmith sandbox guide"
    ),
    Document("olefile-API.md", "olefile/doc/API.md", "olefile API guide (Markdown)"),
    # Plain text, about 5,600 words: the GNU GPL v3 as ldap3 ships it.
    Document("GPL-3.0.txt", "ldap3-*.dist-info/COPYING.txt", "GNU GPL version 3"),
    Document(
        "sqlalchemy-type-migration.txt",
        "sqlalchemy/dialects/type_migration_guidelines.txt",
        "SQLAlchemy's rules for dialect types",
    ),
    # Typeset to PDF from NumPy's reStructuredText guide to masked arrays.
    Document("numpy-masked-arrays.pdf", "numpy/ma/README.rst", "NumPy masked arrays guide"),
]

QUESTIONS = [
    Question(
        "After how long without activity is a sandbox stopped, and when is it deleted?",
        "langsmith-sandbox-README.md",
        "idle_ttl_seconds",
    ),
    Question(
        "How can I connect to a PostgreSQL database running inside the sandbox from my "
        "local machine?",
        "langsmith-sandbox-README.md",
        "postgres",
    ),
    Question(
        "What happens to a running command when the last client disconnects if "
        "kill_on_disconnect is set?",
        "langsmith-sandbox-README.md",
        "kill_on_disconnect",
    ),
    Question(
        "How do I check whether a file is an OLE container before opening it?",
        "olefile-API.md",
        "isOleFile",
    ),
    Question(
        "How can I list all the streams stored in an OLE file, including those inside storages?",
        "olefile-API.md",
        "listdir",
    ),
    Question(
        "May I charge a fee for each copy of the program I convey, and offer a warranty for a fee?",
        "GPL-3.0.txt",
        "charge any price or no price",
    ),
    Question(
        "What installation information must be provided with object code conveyed in a "
        "User Product such as a consumer device?",
        "GPL-3.0.txt",
        "Installation Information",
    ),
    Question(
        "If I violate the license, how are my rights terminated and how can they be reinstated?",
        "GPL-3.0.txt",
        "reinstated",
    ),
    Question(
        "How should a dialect-specific type be named when it takes arguments that the "
        "generic type does not have?",
        "sqlalchemy-type-migration.txt",
        "real name of the type",
    ),
    Question(
        "What are the ischema_names and colspecs dictionaries of a dialect used for?",
        "sqlalchemy-type-migration.txt",
        "ischema_names",
    ),
    Question(
        "What are the main differences between the new MaskedArray class and the old "
        "numpy.core.ma?",
        "numpy-masked-arrays.pdf",
        "is now a property",
    ),
    Question(
        "When two masked arrays are divided, how can the division by zero be avoided?",
        "numpy-masked-arrays.pdf",
        "division by zero",
    ),
]


def site_packages(venv: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def _source(packages: Path, pattern: str) -> Path:
    found = sorted(packages.glob(pattern))
    if not found:
        raise FileNotFoundError(f"{pattern} is not in {packages}: did the pinned venv change?")
    return found[0]


def write_pdf(text: str, path: Path, title: str) -> None:
    """Typeset plain text into an A4 PDF, in Helvetica (a core font: no embedding, and
    its text extracts as written)."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    # It looks for a Helvetica file to measure with and says so; the PDF names the core font.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

    lines: list[str] = []
    # Core fonts speak Latin-1; anything else would not be drawn.
    latin1 = text.encode("latin-1", "replace").decode("latin-1").expandtabs(4)
    for paragraph in latin1.splitlines():
        lines.extend(textwrap.wrap(paragraph, 95, drop_whitespace=False) or [""])
    per_page, height = 64, 11.69
    with (
        matplotlib.rc_context(
            {
                "pdf.use14corefonts": True,
                "font.family": "sans-serif",
                "font.sans-serif": ["Helvetica"],
            }
        ),
        PdfPages(path, metadata={"Title": title}) as pdf,
    ):
        for start in range(0, len(lines), per_page):
            figure = Figure(figsize=(8.27, height))
            for row, line in enumerate(lines[start : start + per_page]):
                y = 1 - (0.6 + row * 0.165) / height
                figure.text(0.08, y, line, fontsize=8.5, va="top", parse_math=False)
            pdf.savefig(figure)


def materialize(venv: Path, into: Path) -> dict[str, Path]:
    """Copy (or typeset) every document into `into`; returns name -> path."""
    packages = site_packages(venv)
    into.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for doc in DOCUMENTS:
        source, target = _source(packages, doc.source), into / doc.name
        if target.suffix == ".pdf":
            write_pdf(source.read_text(encoding="utf-8"), target, doc.what)
        else:
            shutil.copyfile(source, target)
        paths[doc.name] = target
    return paths
