"""The tokenizer files of an exported Hugging Face folder, so that it loads in transformers
with the tokenizer the model was trained with (``AutoTokenizer.from_pretrained``), and the
special token ids its config.json names.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

__all__ = ["special_token_ids", "write_tokenizer"]


def special_token_ids(tokenizer_model: Optional[str]) -> dict[str, Optional[int]]:
    """BOS/EOS/UNK/PAD ids of the training tokenizer (None where it has none; {} without a
    tokenizer)."""
    if tokenizer_model is None:
        return {}
    from megatron_mile.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    ids = {"bos": tok.bos, "eos": tok.eos, "unk": tok.unk, "pad": tok.pad}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def write_tokenizer(tokenizer_model: str, out_dir: str) -> None:
    """Write the training tokenizer's files into the HF folder.

    A Hugging Face ``tokenizer.json`` is copied with the ``tokenizer_config.json`` and
    ``special_tokens_map.json`` beside it (or, without them, a ``PreTrainedTokenizerFast``
    config naming its BOS/EOS/PAD/UNK), so the folder loads with the same tokenizer.
    A SentencePiece model is copied and described as HF's ``LlamaTokenizer``; no BOS/EOS is
    added when encoding: the model was trained on documents without a BOS
    (``megatron-mile-preprocess`` appends only ``</s>``).
    """
    from megatron_mile.data.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    if isinstance(tok, HFTokenizer):
        src = os.path.dirname(tok.path)
        shutil.copyfile(tok.path, os.path.join(out_dir, "tokenizer.json"))
        copied = [name for name in ("tokenizer_config.json", "special_tokens_map.json")
                  if os.path.isfile(os.path.join(src, name))]
        for name in copied:
            shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
        if "tokenizer_config.json" in copied:
            return
        tokens = {f"{name}_token": tok.token(i) for name, i in
                  (("bos", tok.bos), ("eos", tok.eos), ("unk", tok.unk), ("pad", tok.pad))
                  if i >= 0}
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "clean_up_tokenization_spaces": False, "model_max_length": None, **tokens}
    else:
        shutil.copyfile(tok.path, os.path.join(out_dir, "tokenizer.model"))
        sp = tok._sp
        tokens = {name: sp.id_to_piece(i) for name, i in
                  (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                   ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())) if i >= 0}
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": None, **tokens}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f, indent=2)
