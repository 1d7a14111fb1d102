#!/usr/bin/env bash
# Multi-node training with torchrun (no scheduler). Run this on every node with the same MAIN_ADDR
# (the first node's address, reachable from all nodes) and its own NODE_RANK (0 .. NODES-1):
#
#   MAIN_ADDR=10.0.0.1 NODE_RANK=0 NODES=2 bash scripts/torchrun_multinode.sh
#   MAIN_ADDR=10.0.0.1 NODE_RANK=1 NODES=2 bash scripts/torchrun_multinode.sh
#
# Lightning Fabric detects torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).
set -euo pipefail
: "${MAIN_ADDR:?set MAIN_ADDR to the first node's address}"
: "${NODE_RANK:?set NODE_RANK to this node's index}"
NODES=${NODES:-2}
DEVICES=${DEVICES:-$(nvidia-smi --list-gpus | wc -l)}
MAIN_PORT=${MAIN_PORT:-29500}

source scripts/nccl_env.sh  # NCCL settings; set NCCL_SOCKET_IFNAME to the interface your nodes talk over

uv run torchrun --nnodes "$NODES" --node_rank "$NODE_RANK" --nproc_per_node "$DEVICES" \
  --master_addr "$MAIN_ADDR" --master_port "$MAIN_PORT" \
  run_train.py --devices "$DEVICES" --num_nodes "$NODES" --resume auto "$@"
