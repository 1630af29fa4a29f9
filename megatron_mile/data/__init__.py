"""Data for MiLe pretraining: tokenizers, preprocessing to Megatron's indexed format, datasets.

Modules (imported explicitly; this package imports nothing so that tools start fast):

* ``text_input``: reading text/JSONL records with line numbers, classifying bad input.
* ``tokenizer_training``: training SentencePiece models (``megatron-mile-train-tokenizer``).
* ``tokenizer``: :class:`SentencePieceTokenizer`, :class:`NullTokenizer` (megatron-core API).
* ``preprocess``: text/JSONL -> ``.bin``/``.idx`` (``megatron-mile-preprocess``).
* ``corpus``: the built-in quickstart corpus (``megatron-mile-prepare-corpus``).
* ``config``: :class:`DataConfig`, the data section of the training configuration.
* ``datasets``: ``build_tokenizer``, ``build_datasets``, ``build_data_loader``.
"""
