"""Everything Hugging Face, for every model family (``megatron_mile/models``):

* ``config``: a folder's config.json -> the run's model family and shape; the exported one.
* ``safetensors``: the tensor -> file map, the headers' shapes, :class:`HFCheckpoint` (each
  rank memory-maps the files and reads only its own slices).
* ``tensors``: the family's tensor table at work (split for export, assemble a TP slice for
  import, the shapes config.json implies).
* ``importer``: ``checkpoint.init_from_hf`` and ``megatron-mile-import-hf``.
* ``export``: ``megatron-mile-export-hf`` (weights, config.json, generation_config.json).
* ``tokenizer``: the tokenizer files the export ships.

Imported explicitly (this package imports nothing, so the configuration and the tools stay
light).
"""
