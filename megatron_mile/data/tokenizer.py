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
:class:`HFTokenizer` wraps a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library, an
optional dependency: ``pip install 'megatron-mile[hf]'``), e.g. LLaMA-3's byte-level BPE.
:func:`load_tokenizer` picks the class from a path: a ``.model`` file, a ``tokenizer.json``,
or a Hugging Face folder holding either (``tokenizer.json`` preferred).
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

from megatron_mile.data.integrity import DataError

NO_TOKEN = -1
"""Id returned for a special token the tokenizer does not have (megatron-core's convention)."""


class SentencePieceTokenizer(MegatronTokenizerBase):
    """A SentencePiece ``.model`` behind megatron-core's tokenizer interface.

    Args:
        model_path: path of the ``.model`` file.

    Raises:
        FileNotFoundError: ``model_path`` does not exist (the message says how to make one).
        DataError: the file is not a SentencePiece model, or it has no ``</s>`` (EOD) token
            (a ``ValueError``: the trainer and every tool print it as one line, exit 2).
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
            raise DataError(f"{model_path} is not a SentencePiece model: {err}") from None
        if self._sp.eos_id() < 0:
            raise DataError(
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


def _special_token(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string, or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# End-of-text tokens recognised when no tokenizer_config.json names the EOS.
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


class HFTokenizer(MegatronTokenizerBase):
    """A Hugging Face ``tokenizer.json`` behind the same interface as
    :class:`SentencePieceTokenizer`: ``tokenize`` adds no BOS/EOS (preprocessing appends EOS
    as end of document), ``detokenize`` drops special tokens.

    BOS/EOS/PAD/UNK come from the ``tokenizer_config.json`` beside the file when present
    (``bos_token``, ``eos_token`` ...), else from the usual names (``</s>``,
    ``<|end_of_text|>``, ``<|endoftext|>``; ``<s>``, ``<|begin_of_text|>``).

    Args:
        path: the ``tokenizer.json`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImportError: the ``tokenizers`` package is missing (the message says how to add it).
        DataError: not a tokenizer.json (or its tokenizer_config.json is not JSON), or no
            end-of-text token to end documents with.
    """

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        text = _read_text(path, "a Hugging Face tokenizer.json")
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        config: dict = {}
        if os.path.isfile(config_path):
            import json

            try:
                config = json.loads(_read_text(config_path, "JSON"))
            except json.JSONDecodeError as err:
                raise DataError(f"{config_path} is not JSON: {err}") from None
            if not isinstance(config, dict):
                raise DataError(f"{config_path} is not a JSON object of tokenizer settings")
        super().__init__(path, {"library": "huggingface"})
        self._load(path, text, config)

    def _load(self, path: str, text: str, config: dict) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise ImportError(f"{path} is a Hugging Face tokenizer.json, which needs the "
                              "`tokenizers` package: pip install 'megatron-mile[hf]'") from None
        self.path, self._text, self._config = path, text, config
        try:
            self._tok = _Tokenizer.from_str(text)
        except Exception as err:  # the library raises its own exception type
            raise DataError(f"{path} is not a Hugging Face tokenizer.json: "
                            f"{' '.join(str(err).split())}") from None
        self._ids = {name: self._find(name, candidates) for name, candidates in
                     (("eos", _EOS_CANDIDATES), ("bos", _BOS_CANDIDATES), ("pad", ()),
                      ("unk", ()))}
        if self._ids["eos"] == NO_TOKEN:
            raise DataError(f"{path} has no end-of-text token (eos_token in "
                             "tokenizer_config.json, or one of " + ", ".join(_EOS_CANDIDATES)
                             + ") to end documents with")
        self._sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _find(self, name: str, candidates: Sequence[str]) -> int:
        token = _special_token(self._config.get(f"{name}_token"))
        for t in ([token] if token else list(candidates)):
            i = self._tok.token_to_id(t)
            if i is not None:
                return i
        return NO_TOKEN

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "text": self._text, "config": self._config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.library = "huggingface"
        self._load(state["path"], state["text"], state["config"])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: pretraining only."""
        raise NotImplementedError("HFTokenizer has no chat template")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        """Token -> id."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token."""
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        """End-of-document id: the EOS, appended to every document by preprocessing."""
        return self._ids["eos"]

    @property
    def eos(self) -> int:
        """EOS id."""
        return self._ids["eos"]

    @property
    def bos(self) -> int:
        """BOS id, or -1."""
        return self._ids["bos"]

    @property
    def pad(self) -> int:
        """PAD id, or -1."""
        return self._ids["pad"]

    @property
    def unk(self) -> int:
        """UNK id, or -1 (byte-level BPE has none)."""
        return self._ids["unk"]

    def token(self, i: int) -> str:
        """The token string of id ``i``."""
        return self._tok.id_to_token(i)

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Cache key material: the tokenizer.json's content hash and the special ids."""
        return OrderedDict([("class", type(self).__name__), ("json_sha256", self._sha256),
                            ("eos", self.eos)])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _read_text(path: str, what: str) -> str:
    """The UTF-8 text of ``path``; DataError naming the file when it is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not {what} (not UTF-8 text: {err})") from None


def resolve_tokenizer_path(path: str) -> str:
    """The file :func:`load_tokenizer` reads for ``path``: the file itself, or a folder's
    ``tokenizer.json`` (preferred) or ``tokenizer.model``."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model")
    return path


def load_tokenizer(path: str) -> "SentencePieceTokenizer | HFTokenizer":
    """The tokenizer at ``path``: a SentencePiece ``.model``, a Hugging Face
    ``tokenizer.json``, or a folder holding one of them (``tokenizer.json`` first, with its
    ``tokenizer_config.json`` for the special tokens). Both have the same interface."""
    file = resolve_tokenizer_path(path)
    if file.endswith(".json"):
        return HFTokenizer(file)
    return SentencePieceTokenizer(file)


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


Tokenizer = SentencePieceTokenizer | HFTokenizer | NullTokenizer


def vocabulary_digest(tokenizer: Tokenizer) -> str:
    """SHA-256 of what a model's token ids mean: the tokenizer's id -> piece table and its EOD
    id (a null tokenizer: its size). Two tokenizers with the same table have the same digest
    whatever their files; a tokenizer of the same size with other pieces does not."""
    digest = hashlib.sha256(f"{type(tokenizer).__name__} eod={tokenizer.eod}\n".encode())
    if not isinstance(tokenizer, NullTokenizer):
        pieces = tokenizer.inv_vocab
        for i in range(tokenizer.vocab_size):
            digest.update(pieces.get(i, "").encode("utf-8", "surrogatepass") + b"\0")
    else:
        digest.update(str(tokenizer.vocab_size).encode())
    return digest.hexdigest()
