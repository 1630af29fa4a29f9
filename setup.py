"""megatron-mile: MiLe loss (entropy-weighted cross-entropy) for megatron-core GPT pretraining."""

from setuptools import find_packages, setup

setup(
    name="megatron-mile",
    version="0.1.0",
    description=(
        "MiLe loss (arXiv 2310.19531) over tensor-parallel logits, inside a "
        "megatron-core GPT pretraining loop"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mile", "megatron_mile.*"]),
    package_data={"megatron_mile": ["configs/*.yaml"]},
    install_requires=[
        # megatron-core moves its APIs between releases: pin the one this code is written for.
        "megatron-core==0.16.1",
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "sentencepiece>=0.2",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "transformers", "safetensors", "tokenizers",
                 "matplotlib", "mfusepy", "wandb"],
        # Weights & Biases logging (logging.wandb_project; docs/observability.md).
        "wandb": ["wandb"],
        # Hugging Face interop: import/export of checkpoints, tokenizer.json tokenizers.
        "hf": ["safetensors", "tokenizers"],
        # Evaluation tools: per-frequency plots, Hugging Face export.
        "eval": ["matplotlib", "safetensors"],
        # Transformer Engine comes with NVIDIA's PyTorch containers; listed for bare installs.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "megatron-mile-train=megatron_mile.train:main",
            "megatron-mile-prepare-corpus=megatron_mile.cli.prepare_corpus:main",
            "megatron-mile-train-tokenizer=megatron_mile.cli.train_tokenizer:main",
            "megatron-mile-preprocess=megatron_mile.cli.preprocess:main",
            "megatron-mile-eval-frequency=megatron_mile.cli.eval_frequency:main",
            "megatron-mile-export-hf=megatron_mile.cli.export_hf:main",
            "megatron-mile-import-hf=megatron_mile.cli.import_hf:main",
            "megatron-mile-estimate-memory=megatron_mile.cli.estimate_memory:main",
        ],
    },
)
