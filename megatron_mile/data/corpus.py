"""The built-in quickstart corpus: the docstrings of the Python standard library.

Why this text:

* It is on every machine that can run this project: the standard library's ``.py`` sources
  ship with CPython (python.org builds, pyenv, Debian's ``python3``, the official Docker
  images). CI needs no download, no apt/pip step and no network; nothing third-party is
  committed to this repository.
* It is natural English prose (API explanations, examples), about 2 MB per Python release:
  enough to train a tiny model and see its loss fall well below the unigram entropy.
* It is reproducible: for a given Python version the output is byte-identical (files walked
  in sorted order, documents split by a hash of their name). ``corpus.json`` records the
  Python version and the SHA-256 of every output file; different Python versions give
  different (similar) corpora.

Alternatives considered: a public-domain book from a Debian package (``bible-kjv-text``) needs
an ``apt-get install`` in CI, ships a binary format for the ``bible`` program rather than
plain text, and exists only on Debian-like systems; anything fetched from the web is ruled
out by the no-download constraint.

One document per module (its module, class and function docstrings in source order, blank
line separated) plus one per topic of the language reference bundled in
``pydoc_data.topics`` (the text behind ``help("with")``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from megatron_mile.utils import atomic_write_text

CORPUS_VERSION = 1
"""Bumped when the extraction changes, so cached corpora are rebuilt."""

TRAIN_FILE = "train.jsonl"
VALID_FILE = "validation.jsonl"
MANIFEST_FILE = "corpus.json"

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "_bundled"}
_MIN_MODULES = 100  # fewer means the stdlib sources are missing (e.g. a .pyc-only install)


@dataclass
class CorpusManifest:
    """What :func:`prepare_corpus` wrote (saved as ``corpus.json``)."""

    corpus_version: int
    python_version: str
    stdlib_dir: str
    valid_permille: int
    train_documents: int
    valid_documents: int
    train_bytes: int
    valid_bytes: int
    modules_skipped: int
    sha256: dict[str, str]


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                             and not d.startswith(("config-", "lib-dynload")))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(source: bytes) -> list[str]:
    """Module, class and function docstrings in source order (cleaned of indentation)."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                found.append((getattr(node, "lineno", 0), doc.strip()))
    return [d for _, d in sorted(found, key=lambda x: x[0])]


def iter_documents(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(name, text)`` for every document, in a fixed order.

    Names are ``stdlib/<relative path>`` and ``pydoc_topics/<topic>``.

    Raises:
        FileNotFoundError: the standard library sources are missing.
    """
    root = root or stdlib_dir()
    files = _module_files(root)
    if len(files) < _MIN_MODULES:
        raise FileNotFoundError(
            f"found {len(files)} standard library .py files under {root}, expected hundreds: "
            f"this Python ships without its library sources. Install them (Debian/Ubuntu: "
            f"apt-get install libpython3-stdlib; or use a python.org/pyenv build)")
    for path in files:
        try:
            docs = _docstrings(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError):
            yield f"stdlib/{path.relative_to(root).as_posix()}", ""  # counted as skipped
            continue
        if docs:
            yield f"stdlib/{path.relative_to(root).as_posix()}", "\n\n".join(docs)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield f"pydoc_topics/{name}", text


def is_validation(name: str, valid_permille: int) -> bool:
    """Deterministic split: a document is held out iff the hash of its name falls in the
    first ``valid_permille`` thousandths (independent of order and of other documents)."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h % 1000 < valid_permille


def prepare_corpus(output_dir: str, valid_permille: int = 50) -> CorpusManifest:
    """Write ``train.jsonl`` and ``validation.jsonl`` (``{"name", "text"}`` per line) and
    ``corpus.json`` into ``output_dir``. Each file appears only when complete.

    Args:
        output_dir: created if missing; existing corpus files are replaced.
        valid_permille: thousandths of the documents held out for validation, in [1, 500].
    """
    if not 1 <= valid_permille <= 500:
        raise ValueError(f"valid_permille={valid_permille}: must be in [1, 500]")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {k: out / f"{k}.tmp-{os.getpid()}" for k in (TRAIN_FILE, VALID_FILE)}
    counts = {TRAIN_FILE: [0, 0], VALID_FILE: [0, 0]}  # documents, bytes
    skipped = 0
    try:
        with open(tmp[TRAIN_FILE], "wb") as ftrain, open(tmp[VALID_FILE], "wb") as fvalid:
            for name, text in iter_documents():
                if not text:
                    skipped += 1
                    continue
                key = VALID_FILE if is_validation(name, valid_permille) else TRAIN_FILE
                line = json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n"
                data = line.encode("utf-8")
                (fvalid if key == VALID_FILE else ftrain).write(data)
                counts[key][0] += 1
                counts[key][1] += len(text.encode("utf-8"))
        sha = {}
        for key, path in tmp.items():
            sha[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            os.replace(path, out / key)
    finally:
        for path in tmp.values():
            if path.exists():
                path.unlink()
    manifest = CorpusManifest(
        corpus_version=CORPUS_VERSION, python_version=platform.python_version(),
        stdlib_dir=str(stdlib_dir()), valid_permille=valid_permille,
        train_documents=counts[TRAIN_FILE][0], valid_documents=counts[VALID_FILE][0],
        train_bytes=counts[TRAIN_FILE][1], valid_bytes=counts[VALID_FILE][1],
        modules_skipped=skipped, sha256=sha)
    _write_json_atomic(out / MANIFEST_FILE, asdict(manifest))
    return manifest


def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
