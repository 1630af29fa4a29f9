#!/usr/bin/env bash
# Launch megatron-mile pretraining: one torchrun agent per node (megatron_mile/node_agent.py),
# c10d rendezvous on the first node.
# The one launcher behind local runs, docker/run.sh and the Slurm scripts in examples/slurm/.
#
# Usage (every setting is an environment variable; see the sections below):
#   CPU, one machine, tiny model on mock data (seconds per step):
#     DEVICE=cpu NPROC_PER_NODE=2 TP=2 MOCK_DATA=true examples/launch.sh training.train_iters=20
#   One 8-GPU node, the paper's 468M model with MiLe:
#     CONFIG=llama_468m LOSS=mile DATA_PATH=/data/pile_text_document \
#       TOKENIZER_MODEL=/data/tokenizer.model CKPT_DIR=/ckpt/468m-mile examples/launch.sh
#   Two nodes by hand (same command on each; node 0 hosts the rendezvous store):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=llama_1.2b ... examples/launch.sh   # on node0
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 CONFIG=llama_1.2b ... examples/launch.sh   # on node1
#   Inside a Slurm allocation (sbatch or salloc) it starts itself once per node with srun:
#     salloc -N 2 --gpus-per-node=8 --ntasks-per-node=1 examples/launch.sh
#   Show the torchrun command instead of running it:  DRY_RUN=1 examples/launch.sh
# Arguments after the script name go to the trainer as KEY=VALUE overrides, after those built
# from the variables below (so they win).
#
# Ranks: torchrun's c10d rendezvous numbers the nodes itself (sorted by host name), so
# NODE_RANK only decides which node hosts the rendezvous store; every rank of one node gets
# consecutive global ranks, RANK = GROUP_RANK * NPROC_PER_NODE + LOCAL_RANK.
set -euo pipefail

MILE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "launch.sh: $*" >&2; exit 2; }

# ---- Hardware ---------------------------------------------------------------------------
DEVICE=${DEVICE:-auto}                     # auto | gpu | cpu
gpu_count() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
if [[ $DEVICE == auto ]]; then
    if (( $(gpu_count) > 0 )); then DEVICE=gpu; else DEVICE=cpu; fi
fi
case $DEVICE in
    gpu) NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}
         export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;   # torchrun's default, said here
    cpu) NPROC_PER_NODE=${NPROC_PER_NODE:-1}
         # the node's cores shared out between the trainers
         export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
         export CUDA_VISIBLE_DEVICES="" ;;     # the trainer then runs on CPU over gloo
    *) die "DEVICE must be auto, gpu or cpu, not '$DEVICE'" ;;
esac
(( NPROC_PER_NODE > 0 )) || die "no GPU found: set DEVICE=cpu or NPROC_PER_NODE"

# ---- Network (safe defaults; set the interface names on clusters with several NICs) -------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}   # 1 on clusters without InfiniBand/RoCE
# Megatron's tensor-parallel communication overlap relies on kernels running in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONUNBUFFERED=1
# Run the trainer of this checkout, whatever megatron-mile the environment has installed.
export PYTHONPATH="$MILE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Optional, passed through only when set: NCCL_SOCKET_IFNAME (e.g. ib0 or ^lo,docker),
# NCCL_IB_HCA (e.g. mlx5), GLOO_SOCKET_IFNAME (the CPU path's interface, e.g. eth0 or lo).
for var in NCCL_SOCKET_IFNAME NCCL_IB_HCA GLOO_SOCKET_IFNAME; do
    if [[ -n ${!var:-} ]]; then export "${var?}"; else unset "$var"; fi
done

# ---- Containers -----------------------------------------------------------------------
CONTAINER=${CONTAINER:-none}               # none | pyxis (srun --container-image) | apptainer
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}       # pyxis: e.g. registry#megatron-mile:0.1 or a .sqsh;
                                           # apptainer: a .sif file
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}     # comma-separated SRC:DST, e.g. /data:/data,/ckpt:/ckpt
CONTAINER_MILE_ROOT=${CONTAINER_MILE_ROOT:-/opt/megatron-mile}   # the checkout inside the image
SRUN_EXTRA_ARGS=${SRUN_EXTRA_ARGS:-}       # site-specific srun flags, e.g. "--mpi=pmix"

# ---- What to train ----------------------------------------------------------------------
# Empty means "as the config says": only what is set here overrides the YAML.
CONFIG=${CONFIG:-tiny}                     # tiny | llama_468m | llama_1.2b | llama_6.7b | a YAML
LOSS=${LOSS:-}                             # mile | focal | cross_entropy
GAMMA=${GAMMA:-}
SIGMA=${SIGMA:-}
TP=${TP:-}
PP=${PP:-}
CP=${CP:-}                                 # context parallel: each sequence split over CP ranks
VPP=${VPP:-}                               # virtual pipeline stages per rank (interleaving)
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-$( [[ -z $TP ]] || { (( TP > 1 )) && echo true || echo false; })}
DISTRIBUTED_OPTIMIZER=${DISTRIBUTED_OPTIMIZER:-}   # true: shard optimizer state over DP
TRANSFORMER_IMPL=${TRANSFORMER_IMPL:-}     # auto (the configs' default: Transformer Engine
                                           # where importable with CUDA) | transformer_engine | local
RECOMPUTE=${RECOMPUTE:-}                   # selective | full activation recomputation
MICRO_BATCH=${MICRO_BATCH:-}               # empty: the config's value
GLOBAL_BATCH=${GLOBAL_BATCH:-}
TRAIN_ITERS=${TRAIN_ITERS:-}
DTYPE=${DTYPE:-}                           # bf16 | fp16 | fp32
FP8=${FP8:-}                               # hybrid | e4m3 (Hopper or newer)
DATA_PATH=${DATA_PATH:-}                   # space-separated Megatron prefixes (optionally weighted)
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
MOCK_DATA=${MOCK_DATA:-$( [[ -z $DATA_PATH ]] || echo false)}   # true: synthetic tokens
CKPT_DIR=${CKPT_DIR:-}                     # saved to, and resumed from when AUTO_RESUME=true
SAVE_INTERVAL=${SAVE_INTERVAL:-}
AUTO_RESUME=${AUTO_RESUME:-true}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-}
TRAIN_MODULE=${TRAIN_MODULE:-megatron_mile.train}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-}             # a script path instead of TRAIN_MODULE
# Seconds the node agent (torchrun's) gives the trainers to save after a signal it forwarded
# (a launch by hand) or a failed rank, before it kills them.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}

# Append KEY=VALUE to the array named $1 when VALUE is not empty.
add() { local -n arr=$1; [[ -z $3 ]] || arr+=("$2=$3"); }

CONFIG_ARGS=(--config "$CONFIG")
MODEL_ARGS=()
add MODEL_ARGS model.transformer_impl "$TRANSFORMER_IMPL"
add MODEL_ARGS model.recompute_granularity "$RECOMPUTE"
LOSS_ARGS=()
add LOSS_ARGS loss.type "$LOSS"
add LOSS_ARGS loss.gamma "$GAMMA"
add LOSS_ARGS loss.sigma "$SIGMA"
PARALLEL_ARGS=()
add PARALLEL_ARGS parallel.tensor_model_parallel_size "$TP"
add PARALLEL_ARGS parallel.pipeline_model_parallel_size "$PP"
add PARALLEL_ARGS parallel.context_parallel_size "$CP"
add PARALLEL_ARGS parallel.sequence_parallel "$SEQUENCE_PARALLEL"
add PARALLEL_ARGS parallel.use_distributed_optimizer "$DISTRIBUTED_OPTIMIZER"
add PARALLEL_ARGS parallel.virtual_pipeline_model_parallel_size "$VPP"
TRAINING_ARGS=()
add TRAINING_ARGS training.micro_batch_size "$MICRO_BATCH"
add TRAINING_ARGS training.global_batch_size "$GLOBAL_BATCH"
add TRAINING_ARGS training.train_iters "$TRAIN_ITERS"
PRECISION_ARGS=()
add PRECISION_ARGS precision.dtype "$DTYPE"
add PRECISION_ARGS precision.fp8 "$FP8"
DATA_ARGS=()
add DATA_ARGS data.mock "$MOCK_DATA"
if [[ -n $DATA_PATH ]]; then
    read -r -a data_paths <<<"$DATA_PATH"
    DATA_ARGS+=("data.data_path=[$(IFS=,; echo "${data_paths[*]}")]")
fi
add DATA_ARGS data.tokenizer_model "$TOKENIZER_MODEL"
CHECKPOINT_ARGS=()
if [[ -n $CKPT_DIR ]]; then
    CHECKPOINT_ARGS+=("checkpoint.save=$CKPT_DIR" "checkpoint.auto_resume=$AUTO_RESUME")
fi
add CHECKPOINT_ARGS checkpoint.save_interval "$SAVE_INTERVAL"
LOGGING_ARGS=()
add LOGGING_ARGS logging.tensorboard_dir "$TENSORBOARD_DIR"

if [[ -n $TRAIN_SCRIPT ]]; then ENTRY=("$TRAIN_SCRIPT"); else ENTRY=(-m "$TRAIN_MODULE"); fi
TRAINER_ARGS=(
    "${CONFIG_ARGS[@]}" "${MODEL_ARGS[@]}" "${LOSS_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}"
    "${PRECISION_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}"
    "$@"
)

case $CONTAINER in
    none) ;;
    pyxis|apptainer) [[ -n $CONTAINER_IMAGE ]] || die "CONTAINER=$CONTAINER needs CONTAINER_IMAGE" ;;
    *) die "CONTAINER must be none, pyxis or apptainer, not '$CONTAINER'" ;;
esac

# Words that run this script inside the image: srun flags for pyxis, a prefix for apptainer.
container_prefix() {
    case $CONTAINER in
        pyxis)
            echo "--container-image=$CONTAINER_IMAGE"
            echo "--container-workdir=$CONTAINER_MILE_ROOT"
            echo "--no-container-mount-home"
            if [[ -n $CONTAINER_MOUNTS ]]; then echo "--container-mounts=$CONTAINER_MOUNTS"; fi ;;
        apptainer)
            echo apptainer; echo exec
            if [[ $DEVICE == gpu ]]; then echo --nv; fi
            if [[ -n $CONTAINER_MOUNTS ]]; then echo "--bind=$CONTAINER_MOUNTS"; fi
            echo "$CONTAINER_IMAGE" ;;
    esac
}

run() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; exit 0; fi
    exec "$@"
}

# ---- Dispatch: inside a Slurm allocation but not yet in a step, start one task per node ---
# (MILE_LAUNCH_ROLE=node marks the per-node copies, inside or outside a container.)
in_allocation=false
if [[ -n ${SLURM_JOB_ID:-} && -z ${SLURM_STEP_ID:-} ]]; then in_allocation=true; fi
if [[ ${MILE_LAUNCH_ROLE:-} != node ]]; then
    export MILE_LAUNCH_ROLE=node
    mapfile -t wrap < <(container_prefix)
    script="$MILE_ROOT/examples/launch.sh"
    if [[ $CONTAINER != none ]]; then script="$CONTAINER_MILE_ROOT/examples/launch.sh"; fi
    if $in_allocation; then
        export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
        srun_args=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES"
                   --kill-on-bad-exit=1 --cpu-bind=none --quiet)
        if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
        read -r -a extra <<<"$SRUN_EXTRA_ARGS"
        if [[ $CONTAINER == pyxis ]]; then srun_args+=("${wrap[@]}"); wrap=(); fi
        run srun "${srun_args[@]}" "${extra[@]}" "${wrap[@]}" bash "$script" "$@"
    fi
    case $CONTAINER in
        none) ;;
        apptainer) run "${wrap[@]}" bash "$script" "$@" ;;
        pyxis) die "CONTAINER=pyxis needs a Slurm allocation; use docker/run.sh or apptainer locally" ;;
    esac
fi

# ---- Per node: rendezvous arithmetic ----------------------------------------------------
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    NNODES=${NNODES:-$SLURM_JOB_NUM_NODES}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    # One port per job, so that two jobs sharing a first node do not collide.
    MASTER_PORT=${MASTER_PORT:-$(( 29500 + SLURM_JOB_ID % 1000 ))}
    RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
else
    NNODES=${NNODES:-1}
    NODE_RANK=${NODE_RANK:-0}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    MASTER_PORT=${MASTER_PORT:-29500}
    RDZV_ID=${RDZV_ID:-megatron-mile}
fi
(( NODE_RANK >= 0 && NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK is not in [0, NNODES=$NNODES)"
if (( NODE_RANK == 0 )); then is_host=1; else is_host=0; fi

DISTRIBUTED_ARGS=(
    --nnodes="$NNODES"
    --nproc-per-node="$NPROC_PER_NODE"
    --rdzv-backend=c10d
    --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
    --rdzv-id="$RDZV_ID"
    --rdzv-conf="is_host=$is_host"
    --max-restarts=0
    # By hand: forward SIGUSR1 (a pre-timeout signal) to the trainers as well, and give them
    # time to save before torchrun kills them.
    "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    --shutdown-timeout="$SHUTDOWN_TIMEOUT"
)
# Who signals the trainers: inside a Slurm job step, Slurm itself sends SIGTERM/SIGUSR1 to
# every process of the step, trainers included, so the node agent forwards nothing (a second
# copy would make a trainer exit without saving); by hand, the agent forwards them.
if [[ -n ${SLURM_STEP_ID:-} ]]; then export MILE_SIGNALS=slurm; else export MILE_SIGNALS=forward; fi

echo "launch.sh: node $NODE_RANK/$NNODES on $(hostname -s): $NPROC_PER_NODE x $DEVICE," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT id $RDZV_ID" >&2
# torchrun's agent, with one line per event instead of its logs and tracebacks
# (megatron_mile/node_agent.py); same arguments as torchrun.
run "${PYTHON:-python}" -m megatron_mile.node_agent "${DISTRIBUTED_ARGS[@]}" "${ENTRY[@]}" "${TRAINER_ARGS[@]}"
