"""Validation loss by token-frequency bucket: the paper's analysis of who learns what.

Shape legend: b micro-batch, s sequence, v/tp vocabulary shard, k buckets, V padded vocab.

1. ``count_token_frequencies``: occurrences of each id in the TRAINING corpus (.bin files).
2. ``frequency_buckets``: ids sorted by count, most frequent first; an id falls in the bucket
   where its cumulative share of occurrences *starts*. With the paper's edges (0.8, 0.95):
   the ids that make up the first 80% of training occurrences, the next 15%, and the rarest
   5% (ids never seen in training, padding rows included, are in the last bucket).
3. ``evaluate_checkpoint``: every validation token is predicted once (non-overlapping windows
   of s + 1 tokens over the concatenated documents); per-token CE and entropy of the predicted
   distribution over the full (padded) vocabulary, as the model trained on it, summed per
   bucket of the *target* id.
4. ``summarize``: per bucket and overall token count, mean CE, perplexity exp(mean CE) and
   mean entropy (nats). Overall CE is the count-weighted mean of the bucket CEs.
5. ``plot_runs``: bar chart comparing several result files.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_mile.data.config import parse_blend

PAPER_EDGES = (0.8, 0.95)
"""Cumulative shares of training occurrences that separate the buckets, as in the paper's
frequency analysis (arXiv 2310.19531); step 2 of the module docstring spells them out."""

_SUMS = ("tokens", "ce", "entropy")  # columns of the [k, 3] float64 accumulator


# --------------------------------------------------------------------------- corpus counts


def _read_tokens(prefix: str) -> np.ndarray:
    """All token ids of an indexed dataset, memory-mapped (``PREFIX.bin`` + ``PREFIX.idx``)."""
    from megatron_mile.data.integrity import index_dtype

    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise FileNotFoundError(f"no indexed dataset at {prefix!r} (missing {prefix}{suffix})"
                                    "; pass the prefix without .bin/.idx")
    dtype = index_dtype(prefix)
    if os.path.getsize(prefix + ".bin") == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(prefix + ".bin", dtype=dtype, mode="r")


def count_token_frequencies(blend: Sequence[str], vocab_size: int,
                            chunk: int = 1 << 24) -> np.ndarray:
    """Occurrences ``[V]`` int64 of every id in the datasets of a Megatron blend.

    Blend weights, if any, are ignored: counts are raw occurrences over all the files.
    """
    prefixes, _ = parse_blend(list(blend), "train data")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for prefix in prefixes:
        tokens = _read_tokens(prefix)
        for start in range(0, len(tokens), chunk):
            part = np.asarray(tokens[start:start + chunk], dtype=np.int64)
            if part.size and int(part.max()) >= vocab_size:
                raise ValueError(f"{prefix}.bin holds id {int(part.max())} >= vocab size "
                                 f"{vocab_size}: another tokenizer's data")
            counts += np.bincount(part, minlength=vocab_size)
    return counts


def check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(e) for e in edges)
    if not edges or any(not 0.0 < e < 1.0 for e in edges) or list(edges) != sorted(set(edges)):
        raise ValueError(f"bucket edges {edges} must be strictly increasing shares in (0, 1), "
                         "e.g. 0.8,0.95")
    return edges


def frequency_buckets(counts: np.ndarray, edges: Sequence[float] = PAPER_EDGES) -> np.ndarray:
    """Bucket index ``[V]`` (0 = most frequent) of every id; ``len(edges) + 1`` buckets.

    Ties are broken by id (a stable sort), so the assignment is deterministic.
    """
    edges = check_edges(edges)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("the training corpus is empty: no frequencies to bucket by")
    order = np.argsort(-counts, kind="stable")
    share_before = (np.cumsum(counts[order]) - counts[order]) / total
    bucket = np.empty(len(counts), dtype=np.int64)
    bucket[order] = np.searchsorted(np.asarray(edges), share_before, side="right")
    bucket[counts == 0] = len(edges)
    return bucket


def bucket_names(edges: Sequence[float]) -> list[str]:
    bounds = [0.0, *edges, 1.0]
    return [f"{100 * lo:g}-{100 * hi:g}%" for lo, hi in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- validation data


def validation_windows(blend: Sequence[str], seq_length: int,
                       max_samples: Optional[int] = None) -> np.ndarray:
    """``[n, s + 1]`` int64 windows over the concatenated validation documents (in file
    order, each document ending with its EOD as preprocessed), stride ``s``: every token but
    the first is a target exactly once. A tail shorter than ``s + 1`` tokens is dropped."""
    prefixes, _ = parse_blend(list(blend), "valid data")
    stream = np.concatenate([np.asarray(_read_tokens(p), dtype=np.int64) for p in prefixes])
    n = max(0, (len(stream) - 1) // seq_length)
    if max_samples is not None:
        n = min(n, max_samples)
    if n == 0:
        raise ValueError(f"validation data {list(blend)} has {len(stream)} tokens: fewer than "
                         f"one window of seq_length + 1 = {seq_length + 1}")
    index = np.arange(n)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    return stream[index]


# --------------------------------------------------------------------------- accumulation


def bucket_sums(ce: torch.Tensor, entropy: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor, bucket_of: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``[k, 3]`` float64: (token count, CE sum, entropy sum) per bucket of the target ids.

    All inputs have the same shape; ``mask`` is 1 for tokens that count.
    """
    keep = mask.reshape(-1) > 0
    b = bucket_of[target.reshape(-1)[keep]]
    out = torch.zeros(num_buckets, len(_SUMS), dtype=torch.float64)
    out[:, 0].index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
    out[:, 1].index_add_(0, b, ce.reshape(-1)[keep].double())
    out[:, 2].index_add_(0, b, entropy.reshape(-1)[keep].double())
    return out


def summarize(sums: torch.Tensor | np.ndarray, names: Sequence[str],
              counts: Optional[np.ndarray] = None,
              bucket_of: Optional[np.ndarray] = None) -> dict:
    """Per-bucket and overall means from ``[k, 3]`` sums (see :func:`bucket_sums`)."""
    sums = np.asarray(sums, dtype=np.float64)

    def stats(row: np.ndarray) -> dict:
        n = int(row[0])
        ce = row[1] / n if n else float("nan")
        return {"tokens": n, "ce": ce, "ppl": math.exp(ce) if n else float("nan"),
                "entropy": row[2] / n if n else float("nan")}

    buckets = []
    for i, name in enumerate(names):
        entry = {"name": name, **stats(sums[i])}
        if counts is not None and bucket_of is not None:
            in_bucket = bucket_of == i
            entry["vocab_ids"] = int(in_bucket.sum())
            entry["train_share"] = float(counts[in_bucket].sum() / max(counts.sum(), 1))
        buckets.append(entry)
    return {"overall": stats(sums.sum(axis=0)), "buckets": buckets}


# --------------------------------------------------------------------------- the evaluation


def _forward_step(tp_group, bucket_of, num_buckets, data_iterator, model):
    """megatron's forward_step_func: logits on the last stage, per-bucket sums as report."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)  # last stage: [b, s, v/tp]

    def loss_func(logits_bsv: torch.Tensor):
        from megatron_mile.loss import vocab_parallel_weighted_cross_entropy

        # [b, s, v/tp] -> [s, b, v/tp]; contiguous() copies, so the fp32 overwrite is harmless.
        logits_sbv = logits_bsv.transpose(0, 1).float().contiguous()
        labels_sb = batch["labels"].transpose(0, 1).contiguous()
        # The padded vocabulary rows count nowhere in the CE and entropy, as in training.
        out = vocab_parallel_weighted_cross_entropy(logits_sbv, labels_sb, weighting="none",
                                                    tp_group=tp_group,
                                                    valid_vocab_size=model.valid_vocab_size)
        sums = bucket_sums(out.ce, out.entropy, labels_sb, batch["loss_mask"].transpose(0, 1),
                           bucket_of, num_buckets)
        return logits_bsv.new_zeros(()), {"sums": sums}

    return output, loss_func


def _batches(windows: np.ndarray, start: int, mbs: int, eod: Optional[int], device):
    """One micro-batch dict of ``mbs`` windows from ``start``; missing rows are masked out."""
    rows = windows[start:start + mbs]
    mask = np.ones((mbs, windows.shape[1] - 1), dtype=np.float32)
    if len(rows) < mbs:
        mask[len(rows):] = 0.0
        rows = np.concatenate([rows, np.zeros((mbs - len(rows), windows.shape[1]), np.int64)])
    tokens, labels = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
    mask_t = torch.from_numpy(mask)
    if eod is not None:
        mask_t[tokens == eod] = 0.0  # eod_mask_loss, as megatron's GPTDataset: input is EOD
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
    return {"tokens": tokens.to(device), "labels": labels.to(device),
            "loss_mask": mask_t.to(device), "position_ids": position_ids.to(device)}


@torch.no_grad()
def evaluate_checkpoint(load_dir: str, *, valid_data: Optional[Sequence[str]] = None,
                        train_data: Optional[Sequence[str]] = None,
                        edges: Sequence[float] = PAPER_EDGES, tp: int = 1, pp: int = 1,
                        micro_batch_size: int = 4, max_samples: Optional[int] = None,
                        dtype: Optional[str] = None, iteration: Optional[int] = None,
                        overrides: Optional[list[str]] = None) -> dict:
    """Per-bucket validation statistics of a checkpoint; the same dict on every rank.

    Runs under any world size divisible by ``tp * pp``; data-parallel ranks split the windows.
    ``valid_data``/``train_data`` default to the checkpoint's ``data.valid_data_path`` and
    ``data.data_path``.

    Collectives: ``load_inference_model``'s; a broadcast of the frequency counts from rank 0;
    megatron's forward-only schedule (PP p2p) and the loss's 2 TP all-reduces per micro-batch;
    one world SUM all-reduce of the ``[k, 3]`` sums.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mile.evaluation.loading import load_inference_model

    edges = check_edges(edges)
    loaded = load_inference_model(load_dir, tp=tp, pp=pp, dtype=dtype, iteration=iteration,
                                  overrides=overrides)
    try:
        cfg = loaded.cfg
        valid_data = list(valid_data or cfg.data.valid_data_path or [])
        train_data = list(train_data or cfg.data.data_path)
        if not valid_data or not train_data:
            raise ValueError("no validation or training data: the checkpoint's config has "
                             f"data_path={cfg.data.data_path}, valid_data_path="
                             f"{cfg.data.valid_data_path}; pass --valid-data/--train-data")
        counts = torch.zeros(loaded.vocab_size, dtype=torch.int64)
        if dist.get_rank() == 0:  # one reader of a possibly huge corpus
            counts = torch.from_numpy(count_token_frequencies(train_data, loaded.vocab_size))
        dist.broadcast(counts, src=0)
        bucket_of = frequency_buckets(counts.numpy(), edges)
        num_buckets = len(edges) + 1

        seq = cfg.model.seq_length
        windows = validation_windows(valid_data, seq, max_samples)
        dp = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        if cfg.data.reset_position_ids or cfg.data.reset_attention_mask:
            logging.getLogger(__name__).warning(
                "the run trained with data.reset_position_ids/reset_attention_mask; this "
                "evaluation attends across document boundaries with running positions")
        eod = None
        if cfg.data.eod_mask_loss:
            from megatron_mile.data.datasets import build_tokenizer

            eod = build_tokenizer(cfg.data).eod
        step = partial(_forward_step, parallel_state.get_tensor_model_parallel_group(),
                       torch.from_numpy(bucket_of), num_buckets)
        sums = torch.zeros(num_buckets, len(_SUMS), dtype=torch.float64)
        forward_backward = get_forward_backward_func()
        per_step = micro_batch_size * dp
        for start in range(0, len(windows), per_step):
            batch = _batches(windows, start + dp_rank * micro_batch_size, micro_batch_size,
                             eod, loaded.device)
            reports = forward_backward(
                forward_step_func=step, data_iterator=iter([batch]), model=[loaded.model],
                num_microbatches=1, seq_length=seq, micro_batch_size=micro_batch_size,
                forward_only=True)
            for report in reports:
                sums += report["sums"]
        # Each DP replica's last stage owns its sums; its TP ranks hold identical copies.
        owner = (parallel_state.is_pipeline_last_stage()
                 and parallel_state.get_tensor_model_parallel_rank() == 0)
        if not owner:
            sums.zero_()
        dist.all_reduce(sums)
    finally:
        parallel_state.destroy_model_parallel()

    names = bucket_names(edges)
    result = summarize(sums, names, counts.numpy(), bucket_of)
    result.update({
        "checkpoint": os.path.abspath(load_dir), "iteration": loaded.iteration,
        "loss": {"type": cfg.loss.type, "gamma": cfg.loss.gamma, "sigma": cfg.loss.sigma},
        "seed": cfg.training.seed, "train_data": train_data, "valid_data": valid_data,
        "bucket_edges": list(edges), "train_tokens": int(counts.sum()),
        "seq_length": seq, "eval_windows": int(len(windows)),
        "vocab_size": loaded.vocab_size,
    })
    return result


# --------------------------------------------------------------------------- plot


def plot_runs(results: Sequence[dict], labels: Sequence[str], path: str,
              metrics: Sequence[str] = ("ppl", "entropy")) -> None:
    """Grouped bars: one group per bucket (and overall), one bar per run, a panel a metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [b["name"] for b in results[0]["buckets"]] + ["overall"]
    for r in results[1:]:
        if [b["name"] for b in r["buckets"]] + ["overall"] != names:
            raise ValueError("the result files use different bucket edges; compare like "
                             "with like")
    titles = {"ppl": "perplexity (exp mean CE)", "ce": "mean cross-entropy (nats)",
              "entropy": "mean entropy of the prediction (nats)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    width = 0.8 / len(results)
    x = np.arange(len(names))
    for ax, metric in zip(axes[0], metrics):
        for i, (r, label) in enumerate(zip(results, labels)):
            values = [b[metric] for b in r["buckets"]] + [r["overall"][metric]]
            ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(x, [f"{n}\n(train occurrences)" if n != "overall" else n
                          for n in names], fontsize=8)
        ax.set_title(titles.get(metric, metric))
        if metric == "ppl":
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("validation loss by training-corpus token-frequency bucket", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
