# The environment every multi-node launcher here exports (sourced from the repository root, where the
# launchers run): NCCL over the nodes' network interface, with errors visible and fatal, and an allocator
# that fragments less.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export PYTORCH_ALLOC_CONF=expandable_segments:True
