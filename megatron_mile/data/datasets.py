"""Tokenizer, GPT datasets and data loaders for the trainer, on megatron-core 0.16.1.

    tokenizer = build_tokenizer(cfg)
    train_ds, valid_ds, test_ds = build_datasets(cfg, tokenizer, seq_length=1024,
                                                 num_samples=(train_iters * gbs, eval_n, test_n),
                                                 seed=1234)
    loader = build_data_loader(train_ds, consumed_samples, micro_batch_size,
                               dp_rank, dp_size, cfg.num_workers)
    batch = next(iter(loader))       # dict of tensors, b = micro_batch_size, s = seq_length:
    # tokens [b, s] int64, labels [b, s] int64 (tokens shifted by one), loss_mask [b, s] float32,
    # position_ids [b, s] int64, and attention_mask [b, 1, s, s] bool (True = masked) only
    # with cfg.create_attention_mask.

Datasets are built by megatron-core's ``BlendedMegatronDatasetBuilder`` (``GPTDataset``, or
``MockGPTDataset`` with ``cfg.mock``). Under ``torch.distributed`` it is called on every rank:
global rank 0 builds and caches the document/sample/shuffle indices first, the others wait at
a barrier and then load the cache. The sample order is fixed by ``seed``; the loader only walks
it, so resuming from ``consumed_samples`` gives exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Callable, Iterator, Sequence

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from torch.utils.data import DataLoader, Dataset

from megatron_mile.cpu_compat import cuda_available
from megatron_mile.data.config import DataConfig
from megatron_mile.data.integrity import DataError, IndexSummary, summarize_indexed_dataset
from megatron_mile.data.tokenizer import NullTokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer ``cfg`` names: ``tokenizer_model`` (SentencePiece .model, HF
    tokenizer.json or a folder holding one, see ``load_tokenizer``), else null."""
    if cfg.tokenizer_model is not None:
        return load_tokenizer(cfg.tokenizer_model)
    assert cfg.vocab_size is not None  # DataConfig guarantees one of the two
    return NullTokenizer(cfg.vocab_size)


def build_datasets(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    seq_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Build the train, validation and test datasets.

    Args:
        cfg: the data configuration.
        tokenizer: from :func:`build_tokenizer`; its ``eod`` drives ``eod_mask_loss`` and the
            ``reset_*`` options and its vocabulary must cover the data.
        seq_length: tokens per sample (``s``); each sample reads ``s + 1`` tokens.
        num_samples: (train, valid, test) samples to provide at least; a dataset repeats in
            further shuffled epochs to reach it. 0 means the caller does not read that split:
            it is not built (None), and may be empty.
        seed: seed of the shuffles; same seed, same data order.
        is_built_on_rank: whether this rank holds data (e.g. only tensor-parallel rank 0);
            must be True on global rank 0. Default: every rank.

    Returns:
        ``(train, valid, test)``: megatron-core datasets of dict samples, None for a split
        with no data (e.g. a 0 test weight), one the caller does not read (0 samples), or on
        ranks where ``is_built_on_rank`` is False.

    Raises:
        FileNotFoundError: a data prefix has no ``.bin``/``.idx`` (raised on every rank, before
            any index is built; the message says how to create it).
        DataError: malformed files (see ``megatron_mile.data.integrity``), token ids beyond
            the tokenizer's vocabulary, or a split the caller reads that ``split`` leaves
            without a document (megatron-core would loop forever looking for its samples);
            raised on every rank, before any index is built.
        ValueError: bad arguments.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length={seq_length!r}: must be a positive integer")
    if len(num_samples) != 3 or any(
            n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0)
            for n in num_samples):
        raise ValueError(f"num_samples={num_samples!r}: must be (train, valid, test) "
                         f"non-negative integers")
    built_here = is_built_on_rank or (lambda: True)
    per_split = cfg.blend_per_split()
    if per_split is not None:  # a split nobody reads is not built
        per_split = [blend if n else None for blend, n in zip(per_split, num_samples)]
    gpt_cfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None if per_split else cfg.blend(),
        blend_per_split=per_split,
        split=None if (per_split or cfg.mock) else cfg.split,
        path_to_cache=cfg.path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.create_attention_mask,
        mid_level_dataset_surplus=cfg.mid_level_dataset_surplus,
    )
    if gpt_cfg.split_matrix is not None:
        # Dropping a split keeps the others' document ranges (and so their sample order).
        gpt_cfg.split_matrix = [bounds if n else None
                                for bounds, n in zip(gpt_cfg.split_matrix, num_samples)]
    _check_data(cfg, tokenizer, seq_length, built_here, gpt_cfg.split_matrix)
    cls = MockGPTDataset if cfg.mock else GPTDataset
    with _rank_zero_without_process_group():
        train, valid, test = BlendedMegatronDatasetBuilder(
            cls, list(num_samples), built_here, gpt_cfg).build()
    return train, valid, test


@contextlib.contextmanager
def _rank_zero_without_process_group() -> Iterator[None]:
    """Work around megatron-core 0.16.1: ``BlendedDataset._build_indices`` calls
    ``torch.distributed.get_rank()`` unguarded when ``path_to_cache`` is set, which raises in
    a single process without a process group. There the one process *is* rank 0, so answer 0
    for the duration of the build; with a process group nothing is changed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def _check_data(cfg: DataConfig, tokenizer: Tokenizer, seq_length: int,
                built_here: Callable[[], bool],
                split_matrix: Sequence[tuple[float, float] | None] | None) -> None:
    """Raise on every rank if any rank lacks data or has bad data, so that no rank waits in
    a barrier. Every building rank checks that its files exist; global rank 0 alone checks
    their contents (the first start scans each ``.bin`` once for the job, not once a rank)
    and, with ``split_matrix`` (megatron-core's [train, valid, test] document ranges, None
    for a split not built), that every built split of ``data_path`` has a document.
    Collectives: one ``all_gather_object`` when a process group exists."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    check_contents = not distributed or torch.distributed.get_rank() == 0
    error: str | None = None
    if not cfg.mock and built_here():
        try:
            for name, prefix in cfg.all_prefixes():
                summary = _check_prefix(name, prefix, tokenizer.vocab_size, seq_length,
                                        check_contents)
                if summary is not None and split_matrix is not None and name == "data_path":
                    _check_splits(cfg, prefix, summary.num_sequences, split_matrix)
        except (FileNotFoundError, DataError) as err:
            error = f"{type(err).__name__}: {err}"
    errors = [error]
    if distributed:
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
    for rank, err in enumerate(errors):
        if err is not None:
            where = f" (reported by rank {rank})" if len(errors) > 1 else ""
            kind, _, msg = err.partition(": ")
            raise (FileNotFoundError if kind == "FileNotFoundError" else DataError)(msg + where)


_SPLIT_NAMES = ("train", "validation", "test")


def _check_splits(cfg: DataConfig, prefix: str, num_documents: int,
                  split_matrix: Sequence[tuple[float, float] | None]) -> None:
    """DataError when ``split`` gives a built split of ``prefix`` no document: megatron-core's
    ``GPTDataset._get_num_epochs`` would add empty epochs forever. The document ranges are
    megatron-core's own (``BlendedMegatronDatasetBuilder._build_megatron_dataset_splits``)."""
    for i, bounds in enumerate(split_matrix):
        if bounds is None:
            continue
        begin, end = (int(round(b * float(num_documents))) for b in bounds)
        if end > begin:
            continue
        # A share of 2 documents survives megatron's rounding of both ends.
        share = math.ceil(200 / num_documents)
        example = ("" if 2 * share >= 100 else
                   f", e.g. data.split=\"{100 - share},{share},0\"" if i < 2 else
                   f", e.g. data.split=\"{100 - 2 * share},{share},{share}\"")
        unused = (", or training.eval_iters=0 to run without validation" if i == 1 else
                  ", or num_samples 0 for a split the caller does not read" if i == 2 else "")
        raise DataError(
            f"DataConfig.data_path: the {_SPLIT_NAMES[i]} split of {prefix} is empty: "
            f"data.split={cfg.split!r} gives it documents [{begin}, {end}) of the "
            f"{num_documents} in {prefix}.idx, and megatron-core would wait forever for its "
            f"samples. Change data.split so that it gets at least one document{example}; or "
            f"give validation its own data (data.valid_data_path: all of data_path then "
            f"trains){unused}")


def _check_prefix(name: str, prefix: str, vocab_size: int, seq_length: int,
                  check_contents: bool = True) -> IndexSummary | None:
    """Check that ``prefix``'s files exist and, with ``check_contents``, are well formed and
    fit ``vocab_size``; returns their summary (None without ``check_contents``)."""
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f" DataConfig.{name} takes the prefix without .bin/.idx: use {prefix[:-4]!r}."
        elif os.path.isdir(os.path.dirname(prefix) or ".") and any(
                f.startswith(os.path.basename(prefix) + ".bin.tmp-")
                for f in os.listdir(os.path.dirname(prefix) or ".")):
            hint = " A preprocessing run for it was interrupted: run it again."
        raise FileNotFoundError(
            f"DataConfig.{name}: no indexed dataset at prefix {prefix!r} (missing "
            f"{', '.join(missing)}).{hint} Create it with: megatron-mile-preprocess "
            f"--input CORPUS.jsonl --output-prefix {prefix} --tokenizer-model TOKENIZER.model")
    if not check_contents:
        return None
    try:
        summary = summarize_indexed_dataset(prefix)
    except DataError as err:
        raise DataError(f"DataConfig.{name}: {err}") from None
    if summary.max_token_id >= vocab_size:
        raise DataError(
            f"DataConfig.{name}: {prefix}.bin holds token id {summary.max_token_id} but the "
            f"tokenizer has vocab_size={vocab_size}: the data was preprocessed with another "
            "tokenizer. Use that tokenizer_model, or re-run megatron-mile-preprocess with this "
            "one")
    if summary.num_tokens < seq_length + 1:
        logger.warning("DataConfig.%s: %s holds %d tokens, fewer than one sample of "
                       "model.seq_length + 1 = %d: its samples repeat documents across "
                       "epochs", name, prefix, summary.num_tokens, seq_length + 1)
    return summary


class PretrainingSampler:
    """Megatron's pretraining batch sampler: contiguous, deterministic, resumable.

    Sample indices ``consumed_samples, consumed_samples + 1, ...`` are cut into global
    micro-batch sets of ``micro_batch_size * data_parallel_size``; data-parallel rank ``r``
    takes slice ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of each set. The
    dataset itself is already shuffled (by seed), so walking it in order is random but
    reproducible, and restarting at ``consumed_samples`` continues exactly where a run
    stopped. An incomplete last set is dropped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples={total_samples}: the dataset is empty")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size={data_parallel_size}: must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank}: must be in "
                             f"[0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples}: must be in [0, {total_samples}) for a "
                f"dataset of {total_samples} samples. Resuming past its end means "
                f"build_datasets was given fewer train samples than this run needs: raise "
                f"num_samples[0] to at least train_iters * global_batch_size")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_micro_batch = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank yields."""
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for i in range(len(self)):
            first = start + i * self.global_micro_batch
            yield list(range(first, first + self.micro_batch_size))


def build_data_loader(
    dataset: Dataset | None,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int,
    seed: int = 0,
) -> DataLoader | None:
    """A DataLoader over ``dataset`` yielding this DP rank's micro-batches from
    ``consumed_samples`` on (see :class:`PretrainingSampler`); None if ``dataset`` is None.

    Batches are dicts of stacked samples: ``tokens``/``labels``/``position_ids`` [b, s]
    int64, ``loss_mask`` [b, s] float32, ``attention_mask`` [b, 1, s, s] bool if created.

    ``seed`` seeds the loader's own generator. torch's DataLoader draws a base seed for its
    workers each time an iterator is made, from the global torch generator unless given one;
    that draw would shift the dropout stream of a run that builds its iterators after
    restoring a checkpoint's RNG state, and resume would not be exact.
    """
    if dataset is None:
        return None
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: must be >= 0")
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                 data_parallel_rank, data_parallel_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=cuda_available(),
                      persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


__all__: Sequence[str] = ("build_tokenizer", "build_datasets", "build_data_loader",
                          "PretrainingSampler")
