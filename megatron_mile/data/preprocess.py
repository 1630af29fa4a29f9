"""Text/JSONL -> Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), in parallel.

Every good document is tokenized (a SentencePiece ``.model`` or a Hugging Face
``tokenizer.json``, see ``tokenizer.load_tokenizer``) and written with its EOD token (the
tokenizer's EOS) appended, as one sequence, in input order whatever the number of workers. Bad
records (invalid JSON, missing key, non-UTF-8 bytes, empty text) are counted and the first few
reported with ``file:line``; with ``strict=True`` the first one aborts the run.

Crash safety: both files are written under temporary names (``PREFIX.bin.tmp-PID``) and
renamed only when complete, ``.bin`` first and ``.idx`` last, after removing any older
``PREFIX.idx``. An interrupted run therefore never leaves a ``PREFIX.idx`` that megatron-core
would load; temporaries are removed on any Python-level exit (errors, Ctrl-C, SIGTERM via the
CLI) and can be deleted by hand after a SIGKILL.

Work split: the parent reads raw records (bytes, cheap) in chunks of about ``chunk_bytes``;
workers decode, validate and tokenize a chunk each; the parent writes results in order, with
one chunk per worker in flight so memory stays bounded on any input size. A worker that dies
(the OOM killer) is :class:`WorkerDiedError`, never a hang.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence, TextIO

import numpy as np

from megatron_mile.data.text_input import (
    BAD_KINDS, STDIN, BadRecord, InputFormat, Record, check_inputs, decode_record,
    iter_records, resolve_format,
)
from megatron_mile.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from megatron_mile.errors import DataError
from megatron_mile.utils import fsync_path

MB = 1e6


class BadInputError(DataError):
    """A bad record met with ``strict=True``; the message names file, line and reason."""


@dataclass
class PreprocessStats:
    """What a run read and wrote."""

    documents: int = 0
    """Documents written."""
    tokens: int = 0
    """Tokens written, EOD tokens included."""
    input_bytes: int = 0
    """Bytes of input records read, good and bad (a line terminator counts as one byte)."""
    output_bytes: int = 0
    """Size of ``PREFIX.bin``."""
    seconds: float = 0.0
    workers: int = 1
    bad: dict[str, int] = field(default_factory=lambda: {k: 0 for k in BAD_KINDS})
    """Bad records per kind (see :data:`~megatron_mile.data.text_input.BAD_KINDS`)."""
    bad_examples: list[BadRecord] = field(default_factory=list)
    """The first few bad records, in input order."""

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / MB / max(self.seconds, 1e-9)

    def summary(self, output_prefix: str, dtype: str) -> str:
        bad = ", ".join(f"{k} {v}" for k, v in self.bad.items())
        lines = [
            f"wrote {output_prefix}.bin / .idx",
            f"  documents  {self.documents:,} written, {self.bad_total:,} bad skipped ({bad})",
            f"  tokens     {self.tokens:,} ({self.tokens / max(self.documents, 1):.1f} per "
            f"document, EOD included)",
            f"  bytes      {self.input_bytes / MB:.2f} MB read, {self.output_bytes / MB:.2f} MB "
            f"written ({dtype})",
            f"  time       {self.seconds:.2f} s: {self.mb_per_s:.2f} MB/s with {self.workers} "
            f"worker(s) ({self.mb_per_s / self.workers:.2f} MB/s per worker), "
            f"{self.documents / max(self.seconds, 1e-9):,.0f} documents/s",
        ]
        if self.bad_examples:
            lines.append("  first bad records:")
            lines += [f"    {b}" for b in self.bad_examples]
        return "\n".join(lines)


@dataclass
class _ChunkResult:
    tokens: np.ndarray
    """All documents' ids, EOD appended to each, concatenated: [sum(lengths)]."""
    lengths: np.ndarray
    """Ids per document: [documents]."""
    input_bytes: int
    bad: list[BadRecord]
    """Bad records, in input order."""


# Worker state, set once per process by _init_worker.
_TOK: SentencePieceTokenizer | HFTokenizer | None = None
_JSON_KEY = "text"
_DTYPE: type = np.int32


def _init_worker(tokenizer: SentencePieceTokenizer | HFTokenizer, json_key: str,
                 dtype_name: str) -> None:
    global _TOK, _JSON_KEY, _DTYPE
    _TOK = tokenizer  # pickled to spawned workers with its model bytes
    _JSON_KEY = json_key
    _DTYPE = np.dtype(dtype_name).type


def _encode_chunk(fmt: InputFormat, records: list[Record]) -> _ChunkResult:
    assert _TOK is not None, "_init_worker was not called"
    texts: list[str] = []
    bad: list[BadRecord] = []
    for rec in records:
        text = decode_record(rec, fmt, _JSON_KEY)
        if isinstance(text, BadRecord):
            bad.append(text)
        else:
            texts.append(text)
    eod = _TOK.eod
    ids = _encode(texts) if texts else []
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=_DTYPE)
    pos = 0
    for doc in ids:
        tokens[pos:pos + len(doc)] = doc
        tokens[pos + len(doc)] = eod
        pos += len(doc) + 1
    # +1: the line terminator stripped from each record.
    return _ChunkResult(tokens, lengths, sum(len(r.raw) + 1 for r in records), bad)


def _encode(texts: list[str]) -> list[list[int]]:
    if isinstance(_TOK, SentencePieceTokenizer):
        # One thread: parallelism is --workers (SentencePiece would otherwise use every core).
        return _TOK._sp.encode(texts, num_threads=1)
    return _TOK.tokenize_batch(texts)


def _iter_chunks(inputs: Sequence[str], input_format: str, text_split: str,
                 chunk_bytes: int) -> Iterator[tuple[InputFormat, list[Record]]]:
    for path in inputs:
        fmt = resolve_format(path, input_format)
        chunk: list[Record] = []
        size = 0
        for rec in iter_records(path, fmt, text_split):  # type: ignore[arg-type]
            chunk.append(rec)
            size += len(rec.raw)
            if size >= chunk_bytes:
                yield fmt, chunk
                chunk, size = [], 0
        if chunk:
            yield fmt, chunk


def token_dtype(vocab_size: int) -> type:
    """The ``.bin`` dtype megatron-core picks for a vocabulary: uint16 below 65500, else int32."""
    from megatron.core.datasets.indexed_dataset import DType
    return DType.optimal_dtype(vocab_size)


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_model: str,
    *,
    input_format: str = "auto",
    json_key: str = "text",
    text_split: str = "line",
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    chunk_bytes: int = 1 << 20,
    log_interval_s: float = 5.0,
    progress: TextIO | None = sys.stderr,
    max_bad_examples: int = 5,
) -> PreprocessStats:
    """Tokenize ``inputs`` into ``output_prefix.bin`` / ``output_prefix.idx``.

    Args:
        inputs: text or JSONL files (``"-"`` reads standard input).
        output_prefix: written as ``output_prefix.bin`` and ``.idx``; the prefix is what
            ``DataConfig.data_path`` takes.
        tokenizer_model: SentencePiece ``.model``, Hugging Face ``tokenizer.json`` or a folder
            holding one; its EOS (``</s>``, LLaMA-3's ``<|end_of_text|>``) is the EOD token.
        input_format: ``"auto"`` (by suffix), ``"jsonl"`` or ``"text"``.
        json_key: JSONL key holding the text.
        text_split: plain text: ``"line"``, ``"paragraph"`` or ``"file"`` per document.
        workers: tokenizing processes; 1 tokenizes in this process.
        strict: raise :class:`BadInputError` on the first bad record instead of skipping it.
        overwrite: replace an existing ``output_prefix`` dataset (kept intact until the new
            one is complete).
        chunk_bytes: input bytes per unit of work.
        log_interval_s: seconds between progress lines; 0 logs after every chunk.
        progress: where progress lines go; None for silence.
        max_bad_examples: how many bad records to keep for the report.

    Raises:
        FileNotFoundError: an input or the tokenizer model is missing.
        FileExistsError: the output exists and ``overwrite`` is False.
        BadInputError: a bad record with ``strict=True``.
        ValueError: no document could be written, or bad arguments.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    inputs = check_inputs(inputs)
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes}: must be >= 1")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model}; train one with "
                                f"megatron-mile-train-tokenizer")
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    for p in (bin_path, idx_path):
        if os.path.exists(p) and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite (overwrite=True) to replace "
                                  f"the dataset at {output_prefix}")
    tokenizer = load_tokenizer(tokenizer_model)  # ValueError without an EOS to end documents
    dtype = token_dtype(tokenizer.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    stats = PreprocessStats(workers=workers)
    total_bytes = (sum(os.path.getsize(p) for p in inputs) if STDIN not in inputs else None)
    tmp_bin, tmp_idx = f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    pool = None
    t0 = time.perf_counter()
    last_log = t0
    try:
        chunks = _iter_chunks(inputs, input_format, text_split, chunk_bytes)
        if workers == 1:
            _init_worker(tokenizer, json_key, np.dtype(dtype).name)
            results: Iterator[_ChunkResult] = (_encode_chunk(*c) for c in chunks)
        else:
            pool = _Workers(workers, tokenizer, json_key, dtype)
            results = pool.map(chunks)
        for res in results:
            _write_chunk(builder, res, stats, strict, max_bad_examples)
            now = time.perf_counter()
            if progress is not None and now - last_log >= log_interval_s:
                stats.seconds = now - t0
                _log_progress(progress, stats, total_bytes)
                last_log = now
        if stats.documents == 0:
            raise ValueError(
                f"no document written from {list(inputs)}: {stats.bad_total} bad records"
                + (f", first: {stats.bad_examples[0]}" if stats.bad_examples else "")
                + f". For JSONL, check that the text sits under --json-key (now {json_key!r}).")
        builder.finalize(tmp_idx)
        fsync_path(tmp_bin)
        fsync_path(tmp_idx)
        # Commit: drop any old index first so that no state pairs an old .idx with a new .bin.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        fsync_path(os.path.dirname(os.path.abspath(idx_path)))
    finally:
        if pool is not None:
            pool.stop()
        if not builder.data_file.closed:
            builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
    stats.seconds = time.perf_counter() - t0
    stats.output_bytes = os.path.getsize(bin_path)
    if progress is not None:
        _log_progress(progress, stats, total_bytes, final=True)
    return stats


class WorkerDiedError(RuntimeError):
    """A tokenizer worker process ended without being asked to (the OOM killer, a signal)."""


class _Workers:
    """``n`` tokenizer processes, each with its own pipe, given one chunk at a time in turn.

    Chunk ``k`` goes to worker ``k % n`` and its result is read back in the same order, so
    results come in input order with one chunk per worker in flight (memory bounded on any
    input), and the parent sends a worker its next chunk only after reading its last result
    (neither side can block the other on a full pipe). A worker that dies is an error naming
    it, not a hang (``multiprocessing.Pool`` waits forever for the task of a worker killed by
    the OOM killer, and its ``terminate()`` can hang: CPython issues 78178 and 96995);
    :meth:`stop` always returns, in bounded time.
    """

    def __init__(self, n: int, tokenizer: SentencePieceTokenizer | HFTokenizer,
                 json_key: str, dtype: type) -> None:
        import multiprocessing as mp

        # fork: workers start in milliseconds (no re-import of torch/megatron-core).
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.procs: list = []
        self.conns: list = []
        self.busy: collections.deque = collections.deque()
        """Workers with a chunk out, in input order."""
        try:
            for i in range(n):
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, name=f"preprocess-worker-{i}",
                                   args=(there, tokenizer, json_key, np.dtype(dtype).name),
                                   daemon=True)
                proc.start()
                there.close()  # the worker's end lives in the worker only: EOF when it dies
                self.procs.append(proc)
                self.conns.append(here)
        except BaseException:
            self.stop()
            raise

    def map(self, chunks: Iterator[tuple[InputFormat, list[Record]]]) -> Iterator[_ChunkResult]:
        """Each chunk's result, in input order."""
        busy = self.busy
        for i, chunk in zip(range(len(self.conns)), chunks):
            self._send(i, chunk)
            busy.append(i)
        while busy:
            i = busy[0]
            result = self._receive(i)
            busy.popleft()
            chunk = next(chunks, None)
            if chunk is not None:  # before the parent writes this result: overlap
                self._send(i, chunk)
                busy.append(i)
            yield result

    def _send(self, i: int, chunk: tuple[InputFormat, list[Record]]) -> None:
        try:
            self.conns[i].send(chunk)
        except OSError:  # EPIPE: the worker is gone
            raise self._died(i) from None

    def _receive(self, i: int) -> _ChunkResult:
        try:
            kind, payload = self.conns[i].recv()
        except (EOFError, OSError):
            raise self._died(i) from None
        if kind == "error":
            raise payload
        return payload

    def _died(self, i: int) -> WorkerDiedError:
        proc = self.procs[i]
        proc.join(timeout=10)
        code = proc.exitcode
        how = (f"was killed by {_signal_name(-code)}" if code is not None and code < 0
               else f"exited with {code}")
        return WorkerDiedError(
            f"tokenizer worker {i + 1} of {len(self.procs)} (pid {proc.pid}) {how} while "
            "tokenizing (SIGKILL is what the kernel's OOM killer sends when memory runs out); "
            "run again with fewer --workers or a smaller --chunk-mb")

    def stop(self) -> None:
        """End every worker, in bounded time: an idle one on its sentinel, one with a chunk
        out (an error or an interrupt in the parent) at once, by SIGKILL."""
        for i, (proc, conn) in enumerate(zip(self.procs, self.conns)):
            if i in self.busy:
                proc.kill()
                continue
            try:
                conn.send(None)
            except OSError:  # a dead worker's pipe
                proc.kill()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:  # not ended by its sentinel within 5 s
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _worker_main(conn, tokenizer: SentencePieceTokenizer | HFTokenizer, json_key: str,
                 dtype_name: str) -> None:
    """A worker of :class:`_Workers`: encode chunks from ``conn`` until ``None`` or EOF."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us
    # A forked worker inherits the parent's handlers (the CLI's raising one, a trainer's,
    # SIG_IGN): a SIGTERM to the whole job (scancel, kill of the process group) must end it
    # quietly, not raise a traceback in it or leave it running; the parent cleans up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(tokenizer, json_key, dtype_name)
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if chunk is None:
            return
        try:
            conn.send(("ok", _encode_chunk(*chunk)))
        except Exception as e:  # noqa: BLE001 - raised again in the parent
            try:
                conn.send(("error", e))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))


def _write_chunk(builder, res: _ChunkResult, stats: PreprocessStats, strict: bool,
                 max_bad_examples: int) -> None:
    if res.bad and strict:
        b = res.bad[0]
        raise BadInputError(f"{b}. Fix or remove this record, or run without --strict to skip "
                            f"and count bad records.")
    for b in res.bad:
        stats.bad[b.kind] += 1
        if len(stats.bad_examples) < max_bad_examples:
            stats.bad_examples.append(b)
    pos = 0
    for n in res.lengths.tolist():
        builder.add_document(res.tokens[pos:pos + n], [n])
        pos += n
    stats.documents += len(res.lengths)
    stats.tokens += int(pos)
    stats.input_bytes += res.input_bytes


def _log_progress(out: TextIO, stats: PreprocessStats, total_bytes: int | None,
                  final: bool = False) -> None:
    done = (f" ({100 * stats.input_bytes / total_bytes:.0f}%)"
            if total_bytes and not final else "")
    line = (f"docs {stats.documents:,} | {stats.input_bytes / MB:.1f} MB{done} | "
            f"{stats.mb_per_s:.2f} MB/s | bad {stats.bad_total:,}")
    tty = getattr(out, "isatty", lambda: False)()
    out.write(("\r" + line + ("\n" if final else "")) if tty else line + "\n")
    out.flush()


