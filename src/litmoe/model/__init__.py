"""The model: the registered MoE configs and config checks, the fast MoE layer, how LitGPT's GPT is built
with it, attention-kernel choice, and FLOPs counted from parameters."""
