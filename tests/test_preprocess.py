"""Preprocessing to .bin/.idx (bad input, workers, interruption) and the quickstart corpus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import make_documents
from megatron_mile.data.preprocess import BadInputError, _encode_chunk, preprocess
from megatron_mile.data.tokenizer import SentencePieceTokenizer

REPO = Path(__file__).resolve().parents[1]


def _mixed_corpus(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """JSONL with good documents and every kind of bad line; returns the good texts in order
    and the 1-based line numbers of each bad kind."""
    good = make_documents(120, seed=3)
    bad_lines = {
        5: (b'{"text": "unterminated\n', "invalid_json"),
        17: (b'["a", "list"]\n', "invalid_json"),
        30: (b'{"body": "no text key"}\n', "missing_key"),
        44: (b'{"text": 12}\n', "missing_key"),
        61: (b'{"text": "caf\xe9 in latin-1"}\n', "invalid_utf8"),
        75: (b'{"text": "   \\n  "}\n', "empty"),
        90: (b"\n", "empty"),
    }
    where: dict[str, list[int]] = {}
    docs = iter(good)
    with open(path, "wb") as f:
        for line_no in range(1, len(good) + len(bad_lines) + 1):
            if line_no in bad_lines:
                raw, kind = bad_lines[line_no]
                f.write(raw)
                where.setdefault(kind, []).append(line_no)
            else:
                f.write(json.dumps({"text": next(docs)}, ensure_ascii=False).encode() + b"\n")
    return good, where


def _read_docs(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    # Copies: the arrays are views of a memory map closed when `ds` is collected.
    return [np.array(ds[i]) for i in range(len(ds))]


@pytest.mark.parametrize("workers", [1, 2])
def test_counts_bad_input_and_writes_exact_tokens(tmp_path, model_path, workers):
    corpus = tmp_path / "mixed.jsonl"
    good, where = _mixed_corpus(corpus)
    prefix = str(tmp_path / "out")
    # Small chunks: many units of work, so ordering across workers is exercised.
    stats = preprocess([str(corpus)], prefix, model_path, workers=workers, chunk_bytes=512,
                       progress=None, max_bad_examples=3)
    assert stats.documents == len(good)
    assert stats.bad == {k: len(v) for k, v in where.items()}
    assert [(b.line, b.kind) for b in stats.bad_examples] == [
        (5, "invalid_json"), (17, "invalid_json"), (30, "missing_key")]
    assert str(stats.bad_examples[0]).startswith(f"{corpus}:5: invalid json")

    tok = SentencePieceTokenizer(model_path)
    docs = _read_docs(prefix)
    assert len(docs) == len(good)
    for doc, text in zip(docs, good):
        assert doc.tolist() == tok.tokenize(text) + [tok.eod]
    assert stats.tokens == sum(len(d) for d in docs)
    assert docs[0].dtype == np.uint16  # vocab 400 -> the compact dtype
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_plain_text_paragraphs(tmp_path, model_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text("First para\nline two\n\n\nSecond para\n\nThird\n", encoding="utf-8")
    stats = preprocess([str(corpus)], str(tmp_path / "b"), model_path, text_split="paragraph",
                       progress=None)
    tok = SentencePieceTokenizer(model_path)
    assert stats.documents == 3
    assert [tok.detokenize(d[:-1]) for d in _read_docs(str(tmp_path / "b"))] == [
        "First para\nline two", "Second para", "Third"]


def test_strict_fails_on_first_bad_line_and_writes_nothing(tmp_path, model_path):
    corpus = tmp_path / "mixed.jsonl"
    _mixed_corpus(corpus)
    with pytest.raises(BadInputError, match=r"mixed\.jsonl:5: invalid json.*--strict"):
        preprocess([str(corpus)], str(tmp_path / "out"), model_path, workers=2, strict=True,
                   chunk_bytes=256, progress=None)
    assert os.listdir(tmp_path) == ["mixed.jsonl"]


@pytest.mark.timeout(120)
def test_workers_end_whatever_sigterm_handler_the_caller_has(tmp_path, model_path):
    """A caller that ignores SIGTERM (as a trainer does after a peer failure) passes that to
    the forked workers: preprocess still ends them, on success and on a --strict error (a CI
    run hung 600 s in multiprocessing.Pool.terminate() after an in-process CLI run had left
    its handler behind)."""
    corpus = tmp_path / "mixed.jsonl"
    good, _ = _mixed_corpus(corpus)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        stats = preprocess([str(corpus)], str(tmp_path / "lenient"), model_path, workers=2,
                           chunk_bytes=256, progress=None)
        with pytest.raises(BadInputError):
            preprocess([str(corpus)], str(tmp_path / "strict"), model_path, workers=2,
                       strict=True, chunk_bytes=256, progress=None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stats.documents == len(good)


def _broken_on_line_31(fmt, records):  # runs in the forked workers
    if any(r.line == 31 for r in records):
        raise UnicodeError("a tokenizer bug")
    return _encode_chunk(fmt, records)


def _killed_on_line_31(fmt, records):
    if any(r.line == 31 for r in records):
        os.kill(os.getpid(), signal.SIGKILL)
    return _encode_chunk(fmt, records)


@pytest.mark.parametrize("chunk_bytes", [256, 1 << 20])  # many chunks; one chunk
def test_worker_errors_reach_the_caller(tmp_path, model_path, monkeypatch, chunk_bytes):
    """An exception in a worker is raised in the caller, and a dead worker (the OOM killer's
    SIGKILL) is one clear error naming it and the fix, never a hang; nothing is written and
    no worker is left behind."""
    import multiprocessing as mp

    from megatron_mile.data import preprocess as pre

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(60)))
    killed = (r"tokenizer worker [12] of 2 \(pid \d+\) was killed by SIGKILL .* fewer "
              r"--workers or a smaller --chunk-mb")
    for encode, error in ((_broken_on_line_31, "a tokenizer bug"), (_killed_on_line_31, killed)):
        monkeypatch.setattr(pre, "_encode_chunk", encode)
        with pytest.raises((UnicodeError, pre.WorkerDiedError), match=error):
            preprocess([str(corpus)], str(tmp_path / "out"), model_path, workers=2,
                       chunk_bytes=chunk_bytes, progress=None)
        assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]
        assert mp.active_children() == []


def test_cli_says_a_killed_worker_in_one_line(tmp_path, model_path, monkeypatch, capsys):
    from megatron_mile.cli import preprocess as cli
    from megatron_mile.data import preprocess as pre

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(60)))
    monkeypatch.setattr(pre, "_encode_chunk", _killed_on_line_31)
    assert cli.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "out"),
                     "--tokenizer-model", model_path, "--workers", "2", "--chunk-mb", "0.0005",
                     "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tokenizer worker "), err
    assert "was killed by SIGKILL" in err[0]
    assert err[0].endswith(f"nothing written to {tmp_path}/out.idx")
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_a_worker_dead_before_its_next_chunk_is_the_same_error(model_path):
    """A worker that dies between chunks: the send to it is the worker's error, not EPIPE."""
    from megatron_mile.data import preprocess as pre
    from megatron_mile.data.text_input import Record

    workers = pre._Workers(2, pre.load_tokenizer(model_path), "text", np.uint16)
    try:
        workers.procs[1].kill()
        workers.procs[1].join()
        chunks = iter([("jsonl", [Record("c.jsonl", k, b'{"text": "a b"}')]) for k in (1, 2)])
        with pytest.raises(pre.WorkerDiedError, match=r"worker 2 of 2 \(pid \d+\) was killed by "
                                                      r"SIGKILL"):
            list(workers.map(chunks))
    finally:
        workers.stop()
    assert workers.procs == []


def test_failure_before_commit_keeps_previous_dataset(tmp_path, model_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(30)))
    prefix = str(tmp_path / "out")
    preprocess([str(corpus)], prefix, model_path, progress=None)
    before = _read_docs(prefix)
    with pytest.raises(FileExistsError, match="--overwrite"):
        preprocess([str(corpus)], prefix, model_path, progress=None)

    def broken_finalize(self, idx_path):
        Path(idx_path).write_bytes(b"half an index")
        raise OSError("disk full")

    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", broken_finalize)
    with pytest.raises(OSError, match="disk full"):
        preprocess([str(corpus)], prefix, model_path, overwrite=True, progress=None)
    monkeypatch.undo()
    assert [d.tolist() for d in _read_docs(prefix)] == [d.tolist() for d in before]
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "out.bin", "out.idx"]


def test_no_good_document_is_an_error(tmp_path, model_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(ValueError, match="no document written.*--json-key"):
        preprocess([str(corpus)], str(tmp_path / "out"), model_path, progress=None)
    assert not (tmp_path / "out.idx").exists()


@pytest.mark.slow
def test_killed_run_leaves_no_valid_looking_output(tmp_path, model_path):
    """SIGKILL and SIGTERM mid-run (input still streaming on stdin): no PREFIX.idx/.bin;
    SIGTERM also removes the temporaries and exits 1."""
    line = (json.dumps({"text": " ".join(make_documents(5))}) + "\n").encode()
    procs = {}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        prefix = tmp_path / sig.name / "out"
        prefix.parent.mkdir()
        procs[sig] = (prefix, subprocess.Popen(
            [sys.executable, "-m", "megatron_mile.cli.preprocess", "--input", "-",
             "--input-format", "jsonl", "--output-prefix", str(prefix), "--tokenizer-model",
             model_path, "--log-interval", "0", "--chunk-mb", "0.001"],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)}))
    for sig, (prefix, proc) in procs.items():
        proc.stdin.write(line * 200)
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while b"docs " not in proc.stderr.readline():  # first progress line: mid-run
            assert time.monotonic() < deadline and proc.poll() is None, "no progress line"
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        proc.stdin.close()
        proc.stderr.close()
        assert not Path(f"{prefix}.idx").exists() and not Path(f"{prefix}.bin").exists()
        if sig == signal.SIGTERM:
            assert rc == 1
            assert os.listdir(prefix.parent) == []
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    assert not IndexedDataset.exists(str(procs[signal.SIGKILL][0]))


def test_cli_prints_summary(tmp_path, model_path, capsys):
    from megatron_mile.cli import preprocess as cli
    corpus = tmp_path / "mixed.jsonl"
    good, _ = _mixed_corpus(corpus)
    args = ["--input", str(corpus), "--output-prefix", str(tmp_path / "o"),
            "--tokenizer-model", model_path, "--quiet"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"documents  {len(good)} written, 7 bad skipped (invalid_json 2, missing_key 2, " \
           f"invalid_utf8 1, empty 2)" in out
    assert "MB/s" in out and f"{corpus}:5: invalid json" in out
    assert cli.main(args + ["--overwrite", "--strict"]) == 2
    assert "mixed.jsonl:5" in capsys.readouterr().err


@pytest.mark.slow
def test_corpus_is_deterministic_and_split_disjoint(tmp_path):
    from megatron_mile.data.corpus import prepare_corpus

    a = prepare_corpus(str(tmp_path / "a"))
    b = prepare_corpus(str(tmp_path / "b"))
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.sha256 == b.sha256
    names = {split: [json.loads(x)["name"] for x in
                     (tmp_path / "a" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
             for split in ("train", "validation")}
    assert not set(names["train"]) & set(names["validation"])
    assert a.train_bytes > 1_000_000 and a.valid_documents > 10
    assert 0.02 < a.valid_documents / (a.train_documents + a.valid_documents) < 0.09
    assert json.loads((tmp_path / "a" / "corpus.json").read_text())["sha256"] == a.sha256
