"""Context parallelism (CP): each rank of a CP group holds a slice of every sequence.

Shape legend: b micro-batch, s sequence (global), cp context-parallel size, np/ng attention
heads / query groups of this TP rank, hn head size.

Slicing (:func:`slice_batch`) is megatron-core's load-balanced scheme,
``megatron.core.utils.get_batch_on_this_cp_rank`` itself: the sequence is cut into 2 x cp
equal chunks and CP rank r keeps chunks r and 2cp-1-r (for cp=2: rank 0 chunks 0 and 3,
rank 1 chunks 1 and 2), so every rank does the same causal-attention work. Tokens, labels,
loss mask and position ids are cut along dim 1, the optional attention mask ``[b, 1, s, s]``
along its query dim 2 (keys stay global). megatron-core's RoPE slices its frequencies the
same way (``get_pos_emb_on_this_cp_rank``), so a token keeps its global rotary phase.

Attention: with Transformer Engine, TE's attention runs CP (ring p2p). The local (non-TE)
layer spec uses :class:`ContextParallelDotProductAttention`: megatron-core's own
``DotProductAttention`` over all-gathered keys and values, with a causal mask built from
the tokens' global positions. It is exact, not a ring: each rank holds ``[s, b, ng, hn]`` K
and V and ``[b, np, s/cp, s]`` scores for its ``s/cp`` queries, so memory grows with the
global sequence. It runs on CPU (gloo) and on GPU; on CPU it is compared to CP=1 by
tests/test_context_parallel.py.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank, get_pg_size

__all__ = ["ContextParallelDotProductAttention", "global_positions", "slice_batch"]


def slice_batch(batch: dict[str, Any], cp_group: Optional[dist.ProcessGroup]) -> dict[str, Any]:
    """This CP rank's part of a micro-batch: megatron-core's ``get_batch_on_this_cp_rank``
    with the explicit ``cp_group``, on a shallow copy (the loader's dict is left whole).

    ``[b, s]`` tokens / labels / loss_mask / position_ids -> ``[b, s/cp]``; attention_mask
    ``[b, 1, s, s]`` -> ``[b, 1, s/cp, s]``; None values stay None. The batch itself when
    ``cp_group`` is None or of size 1. Works on CPU tensors; s must be a multiple of 2 x cp
    (checked by the config, :meth:`megatron_mile.config.TrainConfig.validate`).
    Collectives: none.
    """
    if get_pg_size(cp_group) == 1:
        return batch
    return get_batch_on_this_cp_rank(dict(batch), cp_group=cp_group)


def global_positions(local_seq_len: int, cp_group: dist.ProcessGroup,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global sequence positions ``([s/cp] of this rank's tokens, [s] of the CP all-gather
    of every rank's tokens, in rank order)``, int64 on ``device``.

    The first is :func:`slice_batch` applied to ``arange(s)``, so it follows whatever chunk
    order the batch slicing uses; the second is the all-gather of the first, the order in
    which :class:`ContextParallelDotProductAttention` receives the keys.
    Collectives: one all-gather of ``s/cp`` int64 on ``cp_group``.
    """
    cp = get_pg_size(cp_group)
    everything = torch.arange(local_seq_len * cp, device=device).unsqueeze(0)  # [1, s]
    local = slice_batch({"positions": everything}, cp_group)["positions"][0].contiguous()
    gathered = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(gathered, local, group=cp_group)
    return local, torch.cat(gathered)


class ContextParallelDotProductAttention(DotProductAttention):
    """megatron-core's local ``DotProductAttention`` for context parallelism: this rank's
    queries against the keys and values of the whole sequence.

    ``forward``: query ``[s/cp, b, np, hn]``, key / value ``[s/cp, b, ng, hn]`` (this rank's
    load-balanced chunks, see :func:`slice_batch`), attention_mask None or ``[b, 1, s/cp, s]``
    bool (True = masked; keys in global order, as :func:`slice_batch` leaves it) -> context
    ``[s/cp, b, np * hn]``.

    Collectives, on the CP group: forward, two all-gathers of ``[s/cp, b, ng, hn]`` (K, V)
    into ``[s, b, ng, hn]`` (megatron's ``gather_from_sequence_parallel_region``, before the
    GQA head expansion, so ng not np heads travel); backward, their two reduce-scatters of
    the ``[s, b, ng, hn]`` gradients (summed over the CP ranks whose queries used them), and
    once per sequence length a small all-gather of positions (:func:`global_positions`).

    The causal mask is built from global positions: query at global position i sees key j
    iff j <= i, whichever rank holds either. The rest (scale, softmax in fp32, dropout,
    GQA) is the parent's code unchanged. Causal self-attention only; no sliding window, no
    packed sequences.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"context-parallel attention is causal only, not {attn_mask_type}")
        # The parent refuses context_parallel_size > 1 (its attention is local): it is built
        # from a copy that says 1, then keeps the real config. Its softmax gets an explicit
        # mask ("arbitrary"): its causal mode (and fused causal kernel) needs s/cp == s.
        local_config = copy.copy(config)
        local_config.context_parallel_size = 1
        super().__init__(local_config, layer_number, AttnMaskType.arbitrary, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError("context-parallel attention does not support sliding windows")
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None:
            from megatron.core import parallel_state

            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group
        self._positions: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _global_positions(self, local_seq_len: int,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (local_seq_len, str(device))
        if key not in self._positions:
            self._positions[key] = global_positions(local_seq_len, self.cp_group, device)
        return self._positions[key]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("context-parallel attention does not support packed sequences")
        q_pos_s, k_pos_s = self._global_positions(query.size(0), query.device)
        key_sbgh = gather_from_sequence_parallel_region(key, True, group=self.cp_group)
        value_sbgh = gather_from_sequence_parallel_region(value, True, group=self.cp_group)
        mask = (k_pos_s.unsqueeze(0) > q_pos_s.unsqueeze(1)).view(
            1, 1, q_pos_s.numel(), k_pos_s.numel())  # [1, 1, s/cp, s]: a future key
        if attention_mask is not None:  # [b, 1, s/cp, s], keys in global order -> rank order
            mask = mask | attention_mask.index_select(3, k_pos_s)
        return super().forward(query, key_sbgh, value_sbgh, mask, AttnMaskType.arbitrary,
                               attention_bias, packed_seq_params)
