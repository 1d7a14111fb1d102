"""Spreading a run over devices: the strategy decision and its Fabric, DeepSpeed ZeRO under LitGPT's
loop and its checkpoints, the memory estimate, and the environment check."""
