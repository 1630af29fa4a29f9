"""Context parallelism on CPU processes (gloo): CP=2 trains like CP=1, step for step.

Two launches: one process (the CP=1 references) and two processes (CP=2, and the unit checks
of the slicing and of the attention that need a CP group). Every run is the product's Trainer
on the shipped tiny config with mock data in fp32, MiLe loss.

- The CP=2 loss curves, MiLe statistics, gradient norms and evaluation losses equal the
  CP=1 ones within 1e-5 relative per step, in both normalisations ("paper" is not
  split-invariant by itself: alpha and the token mean are the micro-batch's, over its whole
  sequence; see loss/reduction.py; run with the fused output layer), and with grouped-query
  attention under selective activation recomputation.
- A CP=2 run resumes from its checkpoint bit-exactly.
- ``slice_batch`` on real batches of the product's loader is megatron-core's
  ``get_batch_on_this_cp_rank`` and is, written out here, chunks (r, 2CP-1-r) of 2 x CP.
- ``ContextParallelDotProductAttention`` on slices of a sequence gives the slices of
  megatron's local ``DotProductAttention`` on the whole sequence: outputs, and the gradients
  of q, k, v (the K/V all-gather's backward reduce-scatters), with GQA and with a document
  (block-diagonal) mask as the loader makes with data.reset_attention_mask.

Tolerance: 1e-5 relative, as tests/test_training.py: the layouts differ only in the order of
floating-point reductions.
"""

from __future__ import annotations

import os

import pytest

from megatron_mile.testing import run_distributed
from trainer_runs import curve, resume_curves, run_trainer

STEPS = 6
RTOL = 1e-5
BASE = [f"training.train_iters={STEPS}", "training.log_interval=3", "training.eval_interval=3",
        "training.eval_iters=1", "optimizer.lr_decay_iters=12"]
RUNS = {  # paper normalisation with the fused output layer: one run for both (time)
    "global": ["loss.normalization=global"],
    "paper_fused": ["loss.normalization=paper", "loss.fused_output_layer=true"],
    # GQA, and the attention core recomputed in backward (its K/V gathers replayed)
    "gqa_recompute": ["model.num_query_groups=2", "loss.normalization=global",
                      "model.recompute_granularity=selective"],
}
CP2 = ["parallel.context_parallel_size=2"]


# Logged per step: the losses, MiLe's statistics (mean entropy and weight, alpha, weight
# range over unmasked tokens), the gradient norm; and the evaluation loss ("valid").
KEYS = ["lm_loss", "objective", "entropy", "weight", "alpha", "weight_min", "weight_max",
        "grad_norm", "valid"]


def _curves(world_size: int, extra: list[str]) -> dict:
    out = {}
    for name, overrides in RUNS.items():
        run = run_trainer(BASE + overrides + extra, world_size)
        out[name] = {key: curve(run, "valid_lm_loss" if key == "valid" else key)
                     for key in KEYS}
    return out


def _single(rank: int, world_size: int) -> dict:
    return _curves(1, [])


def _check_slicing(rank: int) -> dict:
    """Slice real batches of the product's loader (the loader every CP rank reads, DP=1)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_mile.config import load_config
    from megatron_mile.context_parallel import slice_batch
    from megatron_mile.data.datasets import build_data_loader, build_datasets, build_tokenizer
    from megatron_mile.training.builders import initialize_parallel

    cfg = load_config("tiny", CP2 + ["data.create_attention_mask=true",
                                     "data.reset_attention_mask=true"], world_size=2)
    initialize_parallel(cfg)
    cp_group = parallel_state.get_context_parallel_group()
    train_ds, _, _ = build_datasets(cfg.data, build_tokenizer(cfg.data), cfg.model.seq_length,
                                    (16, 4, 4), cfg.training.seed)
    loader = iter(build_data_loader(train_ds, 0, 4, 0, 1, 0, seed=cfg.training.seed))
    out = {"same_as_megatron": True, "chunks_r_and_2cp_1_r": True, "keys": None}
    c = cfg.model.seq_length // 4  # 2 x CP chunks
    for _ in range(2):
        batch = next(loader)
        mine = slice_batch(batch, cp_group)
        theirs = get_batch_on_this_cp_rank({k: v.clone() for k, v in batch.items()}, cp_group)
        out["keys"] = sorted(mine)
        for key, full in batch.items():
            out["same_as_megatron"] &= torch.equal(mine[key], theirs[key])
            dim = 2 if key == "attention_mask" else 1
            expected = torch.cat([full.narrow(dim, rank * c, c),
                                  full.narrow(dim, (3 - rank) * c, c)], dim)
            out["chunks_r_and_2cp_1_r"] &= torch.equal(mine[key], expected)
        out["loader_batch_left_whole"] = batch["tokens"].shape[1] == cfg.model.seq_length
    parallel_state.destroy_model_parallel()
    return out


def _check_attention(rank: int) -> dict:
    """CP attention on this rank's chunks vs megatron's local attention on the whole sequence."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mile.context_parallel import ContextParallelDotProductAttention, slice_batch

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    cp_group = parallel_state.get_context_parallel_group()
    s, b, heads, groups, hn = 32, 2, 4, 2, 8
    common = dict(num_layers=1, hidden_size=heads * hn, num_attention_heads=heads,
                  num_query_groups=groups, attention_dropout=0.0)
    reference = DotProductAttention(TransformerConfig(**common), 1, AttnMaskType.causal, "self")
    cp_attention = ContextParallelDotProductAttention(
        TransformerConfig(context_parallel_size=2, **common), 1, AttnMaskType.causal, "self")

    gen = torch.Generator().manual_seed(7)  # the same full tensors on both ranks
    q, grad_out = (torch.randn(s, b, n, hn, generator=gen) for n in (heads, heads))
    k, v = (torch.randn(s, b, groups, hn, generator=gen) for _ in range(2))
    # Documents of lengths 11, 13, 8: attention stays inside a document (True = masked).
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([11, 13, 8]))
    doc_mask = (doc[None, :] != doc[:, None]).view(1, 1, s, s).expand(b, 1, s, s)

    def local(t_sb):  # [s, ...] -> this rank's [s/cp, ...], by the trainer's slicing
        return slice_batch({"x": t_sb.transpose(0, 1).contiguous()}, cp_group)["x"].transpose(0, 1)

    out = {}
    for name, mask in (("causal", None), ("documents", doc_mask)):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out = reference(*full, attention_mask=None if mask is None else
                            mask | torch.triu(torch.ones(s, s, dtype=torch.bool), 1))
        ref_out.backward(grad_out.flatten(2))
        part = [local(t).detach().requires_grad_() for t in (q, k, v)]
        cp_mask = None if mask is None else slice_batch({"attention_mask": mask}, cp_group)[
            "attention_mask"]
        cp_out = cp_attention(*part, attention_mask=cp_mask)
        cp_out.backward(local(grad_out).flatten(2))
        errors = [(cp_out - local(ref_out)).abs().max()]
        errors += [(p.grad - local(f.grad)).abs().max() for p, f in zip(part, full)]
        out[name] = [e.item() for e in errors]
        out[f"{name}_scale"] = [local(ref_out).abs().max().item()] + [
            f.grad.abs().max().item() for f in full]
    parallel_state.destroy_model_parallel()
    return out


def _pair(rank: int, world_size: int, tmp: str) -> dict:
    out = {"slicing": _check_slicing(rank), "attention": _check_attention(rank)}
    out["cp2"] = _curves(2, CP2)
    out["resume"] = resume_curves(BASE + CP2, 2, os.path.join(tmp, "resume"), steps=4)
    return out


@pytest.fixture(scope="module")
def single():
    return run_distributed(_single, 1, timeout_s=300)[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("context_parallel"))
    return run_distributed(_pair, 2, args=(tmp,), timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("key", KEYS)
def test_cp2_trains_like_cp1(single, pair, name, key):
    expected = single[name][key]
    assert len(expected) == {"valid": 2}.get(key, STEPS), expected
    for rank in (0, 1):  # every CP rank holds the same report
        actual = pair[rank]["cp2"][name][key]
        assert len(actual) == len(expected), (rank, actual)
        for step, (a, e) in enumerate(zip(actual, expected)):
            assert abs(a - e) <= RTOL * abs(e), f"{name} {key} rank {rank} #{step}: {a!r} vs {e!r}"


@pytest.mark.slow
def test_cp2_curve_goes_down(pair):
    """It learns (measured: 6.24 -> 5.97 in 6 steps, still in the lr warm-up)."""
    lm = pair[1]["cp2"]["global"]["lm_loss"]
    assert lm[-1] < lm[0] - 0.2, lm


@pytest.mark.slow
def test_cp2_resume_is_bit_exact(pair):
    """A CP=2 run stopped after 2 of 4 steps and resumed by a fresh trainer (checkpoints are
    sharded over DP x CP) continues exactly."""
    curves = pair[1]["resume"]
    assert curves["resumed_start"] == 3
    assert curves["first"] == curves["straight"][:2]
    assert curves["resumed"] == curves["straight"][2:]


@pytest.mark.slow
def test_slicing_is_megatrons_load_balanced_order_on_loader_batches(pair):
    for rank in (0, 1):
        s = pair[rank]["slicing"]
        assert s["keys"] == ["attention_mask", "labels", "loss_mask", "position_ids", "tokens"]
        assert s["same_as_megatron"] and s["chunks_r_and_2cp_1_r"], (rank, s)
        assert s["loader_batch_left_whole"], (rank, s)


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["causal", "documents"])
def test_cp_attention_matches_local_attention_and_its_gradients(pair, mask):
    for rank in (0, 1):
        errors, scales = pair[rank]["attention"][mask], pair[rank]["attention"][f"{mask}_scale"]
        for what, err, scale in zip(["out", "dq", "dk", "dv"], errors, scales):
            assert err <= RTOL * scale, (rank, mask, what, err, scale)
