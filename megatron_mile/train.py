"""Pretrain a LLaMA-style GPT with MiLe, focal or cross-entropy loss on megatron-core.

One process (CPU, a debug model, mock data):
    python -m megatron_mile.train --config tiny data.mock=true
One node, 8 GPUs, TP=2:
    torchrun --nproc-per-node 8 -m megatron_mile.train --config llama_1.2b \\
        data.data_path=[/data/pile_text_document] data.tokenizer_model=/data/llama.model \\
        parallel.tensor_model_parallel_size=2 loss.type=mile loss.gamma=1.0
Many nodes: examples/launch.sh (the same command under Slurm or by hand).

Overrides are ``section.field=value`` with YAML values; see docs/configuration.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from megatron_mile.errors import EXIT_FAILED, INPUT_ERRORS, ConfigError, MileError, cli_error
from megatron_mile.cpu_compat import cuda_available
from megatron_mile.launch import default_single_process_env
from megatron_mile.log_filters import install_warning_filters
from megatron_mile.run_config import load_run_config

PROG = "megatron-mile-train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="YAML file, or a shipped name: tiny, llama_468m, llama_1.2b, llama_6.7b")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default_single_process_env()  # plain `python -m`: a world of one
    install_warning_filters(cuda=cuda_available())
    try:
        cfg = load_run_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        return cli_error(PROG, e, "configuration error")
    from megatron_mile.training.trainer import Trainer
    from megatron_mile.training.watchdog import is_peer_failure

    try:
        trainer = Trainer(cfg)
    except ConfigError as e:
        return cli_error(PROG, e, "configuration error")
    try:
        try:
            trainer.setup()
        except (*INPUT_ERRORS, ImportError) as e:
            # Bad input found while setting up (layout vs world size, a missing, corrupt or
            # unsafe checkpoint, bad data, an optional package the input needs, e.g.
            # `tokenizers` for a tokenizer.json): every rank reaches the same verdict.
            return cli_error(PROG, e)
        except Exception as e:  # noqa: BLE001 - only peer failures are handled here
            if not is_peer_failure(e):
                raise
            return _peer_failure(trainer, e)
        try:
            summary = trainer.train()
            _record_exit(trainer.rank, summary)
        except MileError as e:
            # The run failed (a full disk during a save, a diverged loss); the last published
            # checkpoint is intact and a restart resumes from it.
            cli_error(PROG, e)
            return EXIT_FAILED
        except Exception as e:  # noqa: BLE001 - only peer failures are handled here
            if not is_peer_failure(e):
                raise
            return _peer_failure(trainer, e)
    finally:
        trainer.shutdown()
    return 0


def _peer_failure(trainer, error: BaseException) -> int:
    """One line for a collective that failed because a peer died or hung (from local rank 0
    only under the node agent: one line per node); exit 3.

    From here SIGTERM and SIGINT are ignored, also after the trainer gives back its handlers:
    the job is ending, and the SIGTERMs with which Slurm ends the step on every node (`srun
    --kill-on-bad-exit`, sometimes twice) must not turn this exit into a "second SIGTERM"
    exit 143 or a death by signal."""
    from megatron_mile.training.watchdog import EXIT_STALLED, speaks_for_node

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    handlers = getattr(trainer, "_previous_handlers", {})
    for sig in handlers:
        handlers[sig] = signal.SIG_IGN
    if not speaks_for_node():
        return EXIT_STALLED
    if trainer.watchdog is not None:
        where = trainer.watchdog.where()
    else:
        where = f"setup ({trainer.setup_phase})"
    hint = ""
    if "dataset" in where:
        hint = (", or global rank 0 took longer than parallel.distributed_timeout_minutes to "
                "build the dataset indices (raise it for the first start on a large corpus: "
                "the indices are cached for later starts)")
    first = " ".join(str(error).split())[:200]
    print(f"megatron-mile-train: rank {trainer.rank}: a collective failed in {where}: "
          f"a peer rank died or hung{hint} ({first}). The last published checkpoint is "
          "intact; restart the job to resume", file=sys.stderr)
    return EXIT_STALLED


def _record_exit(rank: int, summary: dict) -> None:
    """Global rank 0 writes why the run stopped to ``MILE_EXIT_FILE`` when that is set:
    ``{"reason": "completed" | "signal" | "time_limit" | "exit_interval", "iteration": N}``.
    examples/slurm/pretrain.sbatch reads it to requeue a job that stopped for its time limit
    (the exit status is 0 either way)."""
    path = os.environ.get("MILE_EXIT_FILE")
    if not path or rank != 0:
        return
    from megatron_mile.utils import atomic_write_text

    atomic_write_text(path, json.dumps({"reason": summary["exit_reason"],
                                        "iteration": summary["iteration"]}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
