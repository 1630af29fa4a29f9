"""megatron-mile: the MiLe loss as a first-class objective of megatron-core GPT pretraining."""

__version__ = "0.1.0"
