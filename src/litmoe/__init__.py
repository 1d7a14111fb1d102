"""litmoe: pretrain Mixture-of-Experts language models with LitGPT.

`import litmoe` stays light: LitGPT costs about 12 s to import on two cores, and `--help`, a bad flag or a
data-preparation worker should not wait for it. The presets (MoE-200M, MoE-tiny, ...) join LitGPT's registry
through `litmoe.configs.register_configs()`, which resolving `--model` calls; call it yourself before
`litgpt.Config.from_name("MoE-200M")`.
"""

__version__ = "0.1.0"
