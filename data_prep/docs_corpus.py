"""Offline corpora of real text: the docstrings of installed Python packages (English prose), and
their source files (code: the demo's second stream of a mixture).

Every machine that runs this project has the same packages installed (torch, transformers,
numpy, ...), and their documentation is prose written by people. Reading it needs no network and
nothing is committed to the repository. Files are parsed with ``ast`` (never imported), in sorted
order, so the corpus is the same on every machine with the same package versions.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

DEFAULT_PACKAGES = ("torch", "transformers", "numpy", "composer", "streaming", "deepspeed", "pandas")
MIN_CHARS = 200


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def docstrings(root: Path) -> Iterator[str]:
    """Module, class and function docstrings under ``root`` of at least MIN_CHARS characters."""
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    yield doc


def _write_texts(out: str | os.PathLike, texts: Iterable[str], max_docs: int) -> int:
    """Write the first ``max_docs`` of ``texts`` as JSON lines ``{"text": ...}`` to ``out`` (through a
    temporary file, so a half-written corpus never has the final name); returns how many."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    n = 0
    with tmp.open("w") as f:
        for text in itertools.islice(texts, max_docs):
            f.write(json.dumps({"text": text}) + "\n")
            n += 1
    os.replace(tmp, out)
    return n


def _package_roots(packages: Sequence[str]) -> Iterator[Path]:
    return (root for root in map(package_dir, packages) if root is not None)


def write_docs_corpus(
    out: str | os.PathLike, max_docs: int, packages: Sequence[str] = DEFAULT_PACKAGES
) -> int:
    """Write up to ``max_docs`` documents as JSON lines ``{"text": ...}``; returns how many."""

    def unique_docstrings() -> Iterator[str]:
        seen: set[str] = set()
        for root in _package_roots(packages):
            for doc in docstrings(root):
                if doc not in seen:  # inherited and copied docstrings repeat
                    seen.add(doc)
                    yield doc

    return _write_texts(out, unique_docstrings(), max_docs)


def write_code_corpus(
    out: str | os.PathLike, max_docs: int, packages: Sequence[str] = DEFAULT_PACKAGES, max_chars: int = 20_000
) -> int:
    """Write up to ``max_docs`` Python source files (at least MIN_CHARS, at most ``max_chars`` characters
    each, in sorted order) as JSON lines ``{"text": ...}``; returns how many."""

    def sources() -> Iterator[str]:
        for root in _package_roots(packages):
            for path in sorted(root.rglob("*.py")):
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if MIN_CHARS <= len(text) <= max_chars:
                    yield text

    return _write_texts(out, sources(), max_docs)
