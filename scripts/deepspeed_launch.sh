#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher. Run once, on the first node of the hostfile; it starts
# the processes on every node over ssh (pdsh):
#
#   HOSTFILE=scripts/hostfile bash scripts/deepspeed_launch.sh --zero-stage 2
#
# The launcher sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT and the node rank (as CROSS_RANK, which
# run_train.py hands on to Lightning as NODE_RANK); --no_local_rank keeps it from also passing --local_rank.
# Variables listed in ~/.deepspeed_env (NAME=value lines) are exported on every node: put the settings of
# scripts/nccl_env.sh there too.
set -euo pipefail
HOSTFILE=${HOSTFILE:-scripts/hostfile}
NODES=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")
DEVICES=${DEVICES:-$(nvidia-smi --list-gpus | wc -l)}
MAIN_PORT=${MAIN_PORT:-29500}

source scripts/nccl_env.sh  # NCCL settings; set NCCL_SOCKET_IFNAME to the interface your nodes talk over

uv run deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$DEVICES" --master_port "$MAIN_PORT" \
  --no_local_rank \
  run_train.py --strategy deepspeed --devices "$DEVICES" --num_nodes "$NODES" --resume auto "$@"
