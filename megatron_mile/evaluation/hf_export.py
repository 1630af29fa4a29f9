"""Re-exports of the Hugging Face export's names from before issue 19; the code lives in
:mod:`megatron_mile.hf.export` (and the tokenizer files in :mod:`megatron_mile.hf.tokenizer`)."""

from megatron_mile.hf.export import HF_FOLDER_FILES, check_export_target, export_checkpoint
from megatron_mile.hf.tokenizer import write_tokenizer

__all__ = ["HF_FOLDER_FILES", "check_export_target", "export_checkpoint", "write_tokenizer"]
