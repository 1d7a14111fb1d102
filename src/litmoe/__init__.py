"""litmoe: pretrain Mixture-of-Experts language models with LitGPT.

The sub-packages are layers (docs/architecture.md; tests/test_layers.py enforces them): `training` and
`inference` (the commands) over `distributed` (strategies, ZeRO, the memory estimate) over `model` (configs, the
MoE layer, FLOPs) and `data` (sources, tokenizers, prepared data) over `core` (errors, command lines, settings,
checkpoint I/O). A module imports only from its own sub-package and the layers below it.

`import litmoe` stays light: LitGPT costs about 12 s to import on two cores, and `--help`, a bad flag or a
data-preparation worker should not wait for it. The presets (MoE-200M, MoE-tiny, ...) join LitGPT's registry
through `litmoe.model.configs.register_configs()`, which resolving `--model` calls; call it yourself before
`litgpt.Config.from_name("MoE-200M")`.
"""

__version__ = "0.1.0"
