"""Training-loop infrastructure (checkpointing, ...) around megatron-core."""
