"""Tokenizers that megatron-core's GPT datasets accept.

megatron-core 0.16.1 types ``GPTDatasetConfig.tokenizer`` as
``megatron.core.tokenizers.MegatronTokenizerBase`` and its datasets read these members:

* ``vocab_size`` (token dtype of the index), ``eod`` (end-of-document id, used for
  ``eod_mask_loss`` / ``reset_*``), ``pad`` (padding id; -1 when there is none), ``eos``;
* ``unique_identifiers`` (an ``OrderedDict`` hashed into the dataset cache key).

:class:`SentencePieceTokenizer` wraps a ``.model`` file (ours from ``megatron-mile-train-tokenizer``
or an existing one such as LLaMA's ``tokenizer.model``) directly with ``sentencepiece``: no
text rewriting, so ``detokenize(tokenize(text)) == text`` for models trained with our defaults.
:class:`NullTokenizer` reuses megatron-core's null tokenizer for mock data and pre-tokenized
ids; its ``vocab_size`` here is the full vocabulary, the last id being EOD.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any, Sequence

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase
from megatron.core.tokenizers.text.libraries.null_tokenizer import (
    NullTokenizer as _CoreNullTokenizer,
)

NO_TOKEN = -1
"""Id returned for a special token the tokenizer does not have (megatron-core's convention)."""


class SentencePieceTokenizer(MegatronTokenizerBase):
    """A SentencePiece ``.model`` behind megatron-core's tokenizer interface.

    Args:
        model_path: path of the ``.model`` file.

    Raises:
        FileNotFoundError: ``model_path`` does not exist (the message says how to make one).
        ValueError: the file is not a SentencePiece model, or it has no ``</s>`` (EOD) token.
    """

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model not found: {model_path}. Train one with "
                f"`megatron-mile-train-tokenizer --input CORPUS --model-prefix PREFIX` or point "
                f"tokenizer_model at an existing SentencePiece .model (e.g. LLaMA's "
                f"tokenizer.model)")
        with open(model_path, "rb") as f:
            proto = f.read()
        super().__init__(model_path, {"library": "sentencepiece"})
        self._load(model_path, proto)

    def _load(self, model_path: str, proto: bytes) -> None:
        self.path = model_path
        self._proto = proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{model_path} is not a SentencePiece model: {err}") from err
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"{model_path} has no </s> token, which marks the end of each document; retrain "
                f"it with an --eos-id (megatron-mile-train-tokenizer)")
        self._sha256 = hashlib.sha256(proto).hexdigest()

    # Pickled into DataLoader workers and preprocessing processes: ship the model bytes.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.library = "sentencepiece"
        self._load(state["path"], state["proto"])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added)."""
        return self._sp.encode(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (BOS/EOS/PAD) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: pretraining tokenizers have no chat template."""
        raise NotImplementedError("SentencePieceTokenizer has no chat template")

    @property
    def vocab_size(self) -> int:
        """Number of ids, special and byte pieces included."""
        return self._sp.vocab_size()

    @property
    def vocab(self) -> dict[str, int]:
        """Piece -> id."""
        return {self._sp.id_to_piece(i): i for i in range(self._sp.vocab_size())}

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> piece."""
        return {i: self._sp.id_to_piece(i) for i in range(self._sp.vocab_size())}

    @property
    def eod(self) -> int:
        """End-of-document id: ``</s>``, appended to every document by preprocessing."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        """``</s>`` id."""
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        """``<s>`` id, or -1."""
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """``<pad>`` id, or -1 (megatron-core then pads with -1 and masks it out)."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        """``<unk>`` id."""
        return self._sp.unk_id()

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Cache key material: the model's content hash, so moving the file keeps the cache
        and retraining it at the same path does not reuse a stale one."""
        return OrderedDict([("class", type(self).__name__), ("model_sha256", self._sha256)])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class NullTokenizer(_CoreNullTokenizer):
    """Ids as text (``"5 17 3"``), for mock data or already-tokenized corpora.

    Args:
        vocab_size: the full vocabulary size; ids are ``0 .. vocab_size - 1`` and the last one,
            ``vocab_size - 1``, is EOD. (megatron-core's own class adds EOD on top of its
            argument; this one does not, so ``vocab_size`` is what the model's embedding needs.)
    """

    def __init__(self, vocab_size: int) -> None:
        if int(vocab_size) < 2:
            raise ValueError(f"vocab_size={vocab_size}: a null tokenizer needs >= 2 ids "
                             f"(at least one token and EOD)")
        super().__init__(int(vocab_size) - 1)

    def tokenize(self, text: str) -> list[int]:
        """``"5 17 3"`` -> ``[5, 17, 3]``."""
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        """``[5, 17, 3]`` -> ``"5 17 3"``."""
        return " ".join(str(int(i)) for i in ids)

    @property
    def pad(self) -> int:
        """No padding token: -1."""
        return NO_TOKEN

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`."""
        return self.eod

    @property
    def bos(self) -> int:
        """No BOS token: -1."""
        return NO_TOKEN

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Class and vocabulary size."""
        return OrderedDict([("class", type(self).__name__), ("vocab_size", self.vocab_size)])

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self.vocab_size})"


Tokenizer = SentencePieceTokenizer | NullTokenizer
