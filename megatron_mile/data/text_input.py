"""Reading raw text corpora: plain text or JSONL, record by record, with line numbers.

Shared by ``megatron-mile-train-tokenizer`` and ``megatron-mile-preprocess``. Reading and decoding
are split on purpose: :func:`iter_records` yields undecoded bytes (cheap, done by the parent
process), :func:`decode_record` turns one record into text or a :class:`BadRecord` (done in the
worker processes), so that every bad input is found, counted and reported with its line number.

A record is one document:

* JSONL: one line, a JSON object whose ``json_key`` holds the document text.
* plain text, ``text_split="line"``: one line.
* plain text, ``text_split="paragraph"``: a run of non-blank lines (blank lines separate).
* plain text, ``text_split="file"``: the whole file.

Only ``json``, ``os`` and the standard library are imported, so worker processes start fast.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Literal

InputFormat = Literal["jsonl", "text"]
TextSplit = Literal["line", "paragraph", "file"]

INPUT_FORMATS: tuple[str, ...] = ("auto", "jsonl", "text")
TEXT_SPLITS: tuple[str, ...] = ("line", "paragraph", "file")

#: Kinds of bad input, in the order they are reported.
BAD_KINDS: tuple[str, ...] = ("invalid_json", "missing_key", "invalid_utf8", "empty")

STDIN = "-"


@dataclass(frozen=True)
class Record:
    """One undecoded document: where it starts and its raw bytes."""

    source: str
    """Input path, or ``"-"`` for standard input."""
    line: int
    """1-based line number of the record's first line."""
    raw: bytes
    """The record's bytes, line terminators of JSONL/line records stripped."""


@dataclass(frozen=True)
class BadRecord:
    """Why a record was not turned into a document."""

    source: str
    line: int
    kind: str
    """One of :data:`BAD_KINDS`."""
    detail: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.kind.replace('_', ' ')}: {self.detail}"


def resolve_format(path: str, input_format: str) -> InputFormat:
    """Return ``"jsonl"`` or ``"text"`` for ``path``; ``"auto"`` looks at the file suffix.

    Raises:
        ValueError: ``input_format`` is not one of :data:`INPUT_FORMATS`.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format {input_format!r} is not one of {INPUT_FORMATS}")
    if input_format != "auto":
        return input_format  # type: ignore[return-value]
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz"):
        if name.endswith(suffix):
            raise ValueError(f"{path}: compressed input is not supported; decompress it first")
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


def check_inputs(paths: Iterable[str]) -> list[str]:
    """Return ``paths`` as a list after checking that each exists and is a readable file.

    Raises:
        FileNotFoundError: naming the first missing path.
    """
    out = list(paths)
    if not out:
        raise ValueError("no input given: pass at least one --input file (or '-' for stdin)")
    for p in out:
        if p != STDIN and not os.path.isfile(p):
            raise FileNotFoundError(f"input file not found: {p}")
    return out


def _open(path: str) -> BinaryIO:
    return sys.stdin.buffer if path == STDIN else open(path, "rb")


def iter_records(path: str, fmt: InputFormat, text_split: TextSplit = "line") -> Iterator[Record]:
    """Yield the records of one input file, in file order, with 1-based line numbers."""
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text split {text_split!r} is not one of {TEXT_SPLITS}")
    stream = _open(path)
    try:
        if fmt == "jsonl" or text_split == "line":
            for no, line in enumerate(stream, start=1):
                yield Record(path, no, line.rstrip(b"\r\n"))
        elif text_split == "file":
            yield Record(path, 1, stream.read())
        else:  # paragraph
            start, buf = 0, []
            no = 0
            for no, line in enumerate(stream, start=1):
                if line.strip():
                    if not buf:
                        start = no
                    buf.append(line)
                elif buf:
                    yield Record(path, start, b"".join(buf).rstrip(b"\r\n"))
                    buf = []
            if buf:
                yield Record(path, start, b"".join(buf).rstrip(b"\r\n"))
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def decode_record(record: Record, fmt: InputFormat, json_key: str = "text") -> str | BadRecord:
    """Decode one record into its document text, or say why it is bad.

    A document is bad when: its bytes are not UTF-8 (``invalid_utf8``); a JSONL line is not a
    JSON object (``invalid_json``); the object lacks ``json_key`` or its value is not a string
    (``missing_key``); the text is empty or only whitespace (``empty``).
    """
    try:
        text = record.raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord(record.source, record.line, "invalid_utf8",
                         f"byte {err.start} is not UTF-8 ({record.raw[err.start:err.start + 4]!r})")
    if fmt == "jsonl":
        if not text.strip():
            return BadRecord(record.source, record.line, "empty", "blank line")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            return BadRecord(record.source, record.line, "invalid_json", err.msg +
                             f" at column {err.colno}")
        if not isinstance(obj, dict):
            return BadRecord(record.source, record.line, "invalid_json",
                             f"expected a JSON object, got {type(obj).__name__}")
        if json_key not in obj:
            keys = ", ".join(sorted(obj)[:5]) or "none"
            return BadRecord(record.source, record.line, "missing_key",
                             f"no key {json_key!r} (keys: {keys}); choose it with --json-key")
        value = obj[json_key]
        if not isinstance(value, str):
            return BadRecord(record.source, record.line, "missing_key",
                             f"key {json_key!r} holds {type(value).__name__}, not a string")
        text = value
    if not text.strip():
        return BadRecord(record.source, record.line, "empty", "document has no text")
    return text
