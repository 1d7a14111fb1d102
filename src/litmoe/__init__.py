"""litmoe: pretrain Mixture-of-Experts language models with LitGPT.

Importing the package registers the MoE configs (MoE-200M, MoE-tiny) with LitGPT.
"""

from litmoe.configs import register_configs

register_configs()

__version__ = "0.1.0"
