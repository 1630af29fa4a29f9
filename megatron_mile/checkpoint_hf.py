"""Re-exports of the Hugging Face import's names from before issue 19; the code lives in
:mod:`megatron_mile.hf` (``config``, ``safetensors``, ``tensors``, ``importer``) and each
family's tensor table in :mod:`megatron_mile.models`."""

from megatron_mile.hf.config import apply_hf_model_config, read_hf_config
from megatron_mile.hf.importer import import_hf_weights, import_to_checkpoint
from megatron_mile.hf.safetensors import HFCheckpoint, hf_weight_map, read_safetensors_shapes

__all__ = ["HFCheckpoint", "apply_hf_model_config", "hf_weight_map", "import_hf_weights",
           "import_to_checkpoint", "read_hf_config", "read_safetensors_shapes"]
