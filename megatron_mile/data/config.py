"""``DataConfig``: what to train on and how batches are formed.

Every field has its docstring right after it (read by the config documentation); bad values
raise ``ValueError`` in ``__post_init__`` naming the field, the value and what is allowed.

Data is named by Megatron blends: ``data_path`` is either a list of prefixes
(``["data/a", "data/b"]``, weighted by size) or alternating weight/prefix pairs
(``["0.7", "data/a", "0.3", "data/b"]``). A prefix names ``PREFIX.bin`` + ``PREFIX.idx`` as
written by ``megatron-mile-preprocess``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

Blend = tuple[list[str], list[float] | None]
"""(prefixes, weights or None), as megatron-core's ``BlendedMegatronDatasetConfig.blend``."""

_NUMBER = re.compile(r"^\s*[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?\s*$")


@dataclass
class DataConfig:
    """Data section of the training configuration."""

    data_path: list[str] = field(default_factory=list)
    """Megatron blend of indexed datasets: prefixes, or alternating weight/prefix pairs
    (``["0.7", "a", "0.3", "b"]``). Split into train/valid/test by ``split`` unless
    ``valid_data_path`` is given, in which case all of it is training data. Must be empty when
    ``mock`` is set."""

    valid_data_path: list[str] | None = None
    """Optional blend for validation only (e.g. the quickstart's ``validation`` prefix); when
    set, ``data_path`` is used whole for training and ``split`` is ignored."""

    test_data_path: list[str] | None = None
    """Optional blend for the test split; only with ``valid_data_path``."""

    split: str = "969,30,1"
    """Relative train,valid,test weights for carving ``data_path`` by documents, e.g.
    ``"969,30,1"``; 1 to 3 non-negative numbers with a positive sum (missing ones are 0)."""

    mock: bool = False
    """Train on megatron-core's synthetic ``MockGPTDataset`` (no files needed); then
    ``data_path`` must be empty and ``vocab_size`` (or ``tokenizer_model``) set."""

    tokenizer_model: str | None = None
    """SentencePiece ``.model`` file (from ``megatron-mile-train-tokenizer`` or e.g. LLaMA's),
    Hugging Face ``tokenizer.json`` (e.g. LLaMA-3's byte-level BPE; needs ``tokenizers``), or
    a Hugging Face model folder holding one (``tokenizer.json`` first, its
    ``tokenizer_config.json`` naming BOS/EOS); must be the one the data was preprocessed
    with. Exclusive with ``vocab_size``."""

    vocab_size: int | None = None
    """Vocabulary size for the null tokenizer (mock data or pre-tokenized ids), EOD included
    as its last id ``vocab_size - 1``. In [2, 2**31). Exclusive with ``tokenizer_model``."""

    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss (``loss_mask`` is 0 where the input token
    is EOD)."""

    reset_position_ids: bool = False
    """Restart ``position_ids`` at 0 after each EOD inside a sequence."""

    reset_attention_mask: bool = False
    """Block attention across documents packed into one sequence; needs
    ``create_attention_mask``."""

    create_attention_mask: bool = False
    """Put a boolean ``attention_mask`` [1, s, s] (True = masked) in each sample. Off by
    default: causal attention kernels build the mask themselves, and it costs s*s bytes per
    sample."""

    num_workers: int = 2
    """DataLoader worker processes per rank; 0 loads in the training process. In [0, 64]."""

    path_to_cache: str | None = None
    """Directory for megatron-core's document/sample/shuffle index cache; None puts it in
    ``cache/GPTDataset_indices`` next to each dataset."""

    mid_level_dataset_surplus: float = 0.005
    """Extra fraction of samples built per dataset of a weighted blend so the blend never runs
    short (megatron-core's default). In [0, 1]."""

    def __post_init__(self) -> None:
        for name in ("mock", "eod_mask_loss", "reset_position_ids", "reset_attention_mask",
                     "create_attention_mask"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"DataConfig.{name}={value!r}: must be true or false")
        self.data_path = _as_str_list("data_path", self.data_path)
        for name in ("valid_data_path", "test_data_path"):
            if getattr(self, name) is not None:
                setattr(self, name, _as_str_list(name, getattr(self, name)))
        self.split_vector()  # validates split

        if self.mock:
            extra = [n for n in ("data_path", "valid_data_path", "test_data_path")
                     if getattr(self, n)]
            if extra:
                raise ValueError(f"DataConfig.mock=True but {extra[0]}={getattr(self, extra[0])!r}"
                                 f": mock data reads no files; set mock=False or clear it")
        elif not self.data_path:
            raise ValueError("DataConfig.data_path=[]: give at least one dataset prefix (from "
                             "megatron-mile-preprocess), or set mock=True for synthetic data")
        if self.test_data_path and not self.valid_data_path:
            raise ValueError(f"DataConfig.test_data_path={self.test_data_path!r} needs "
                             f"valid_data_path too (otherwise data_path is carved by split)")
        for name in ("data_path", "valid_data_path", "test_data_path"):
            if getattr(self, name):
                parse_blend(getattr(self, name), name)

        if self.tokenizer_model is not None and self.vocab_size is not None:
            raise ValueError(
                f"DataConfig.tokenizer_model={self.tokenizer_model!r} and vocab_size="
                f"{self.vocab_size!r}: set only one (the model defines its vocabulary size)")
        if self.tokenizer_model is None and self.vocab_size is None:
            raise ValueError("DataConfig.tokenizer_model=None and vocab_size=None: set "
                             "tokenizer_model (a SentencePiece .model or tokenizer.json) or, "
                             "for mock or pre-tokenized data, vocab_size")
        if self.tokenizer_model is not None and (not isinstance(self.tokenizer_model, str)
                                                 or not self.tokenizer_model):
            raise ValueError(f"DataConfig.tokenizer_model={self.tokenizer_model!r}: must be a "
                             f"path to a SentencePiece .model, a tokenizer.json or a folder")
        if self.vocab_size is not None and (
                isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int)
                or not 2 <= self.vocab_size < 2**31):
            raise ValueError(f"DataConfig.vocab_size={self.vocab_size!r}: must be an integer "
                             f"in [2, 2**31)")
        if self.reset_attention_mask and not self.create_attention_mask:
            raise ValueError("DataConfig.reset_attention_mask=True needs "
                             "create_attention_mask=True (the mask is what gets reset)")
        if (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                or not 0 <= self.num_workers <= 64):
            raise ValueError(f"DataConfig.num_workers={self.num_workers!r}: must be an integer "
                             f"in [0, 64]")
        if self.path_to_cache is not None and (not isinstance(self.path_to_cache, str)
                                               or not self.path_to_cache):
            raise ValueError(f"DataConfig.path_to_cache={self.path_to_cache!r}: must be a "
                             f"directory path or None")
        s = self.mid_level_dataset_surplus
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
            raise ValueError(f"DataConfig.mid_level_dataset_surplus={s!r}: must be in [0, 1]")

    def split_vector(self) -> list[float]:
        """``split`` as three weights summing to 1, e.g. ``[0.969, 0.03, 0.001]``."""
        parts = [p.strip() for p in str(self.split).split(",")]
        if not 1 <= len(parts) <= 3 or not all(_NUMBER.match(p) for p in parts):
            raise ValueError(f"DataConfig.split={self.split!r}: must be 1 to 3 comma-separated "
                             f"non-negative numbers, e.g. \"969,30,1\"")
        values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
        if not all(math.isfinite(v) for v in values) or sum(values) <= 0:
            raise ValueError(f"DataConfig.split={self.split!r}: weights must be finite with a "
                             f"positive sum")
        if values[0] == 0:
            raise ValueError(f"DataConfig.split={self.split!r}: the train weight must be > 0")
        return [v / sum(values) for v in values]

    def blend(self) -> Blend | None:
        """``data_path`` as megatron-core's (prefixes, weights); None for mock data."""
        return parse_blend(self.data_path, "data_path") if self.data_path else None

    def blend_per_split(self) -> list[Blend | None] | None:
        """[train, valid, test] blends when ``valid_data_path`` is set, else None."""
        if not self.valid_data_path:
            return None
        test = parse_blend(self.test_data_path, "test_data_path") if self.test_data_path \
            else None
        return [parse_blend(self.data_path, "data_path"),
                parse_blend(self.valid_data_path, "valid_data_path"), test]

    def all_prefixes(self) -> list[tuple[str, str]]:
        """``(field name, prefix)`` for every dataset prefix named by this config."""
        out = []
        for name in ("data_path", "valid_data_path", "test_data_path"):
            if getattr(self, name):
                out += [(name, p) for p in parse_blend(getattr(self, name), name)[0]]
        return out


def parse_blend(entries: list[str], name: str = "data_path") -> Blend:
    """Parse a Megatron blend list.

    ``["a", "b"]`` -> ``(["a", "b"], None)``;
    ``["0.7", "a", "0.3", "b"]`` -> ``(["a", "b"], [0.7, 0.3])``.

    Raises:
        ValueError: naming the field when the list mixes the two forms, has an odd length with
            weights, or a weight that is not a positive finite number.
    """
    if not entries:
        raise ValueError(f"DataConfig.{name}=[]: needs at least one prefix")
    numeric = [bool(_NUMBER.match(e)) for e in entries]
    if not any(numeric):
        return list(entries), None
    if len(entries) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise ValueError(
            f"DataConfig.{name}={entries!r}: give either prefixes only or alternating "
            f"weight, prefix pairs such as [\"0.7\", \"data/a\", \"0.3\", \"data/b\"]")
    weights = [float(w) for w in entries[0::2]]
    for w in weights:
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"DataConfig.{name}={entries!r}: weight {w} must be a positive "
                             f"finite number (remove the entry instead of weighting it 0)")
    return list(entries[1::2]), weights


def _as_str_list(name: str, value: object) -> list[str]:
    # YAML gives numbers for weights and a bare string for a single prefix: normalise both.
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"DataConfig.{name}={value!r}: must be a list of strings")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or v == "":
            raise ValueError(f"DataConfig.{name}={list(value)!r}: entry {v!r} is not a "
                             f"non-empty prefix or weight")
        out.append(str(v))
    return out
