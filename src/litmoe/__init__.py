"""litmoe: pretrain Mixture-of-Experts language models with LitGPT.

Importing the package registers the MoE configs (MoE-200M, MoE-tiny, ...) with LitGPT. Data-preparation
worker processes skip that: they need only `tokenizers` and litdata, and importing LitGPT would cost each one
12 s and 0.9 GB on two cores (litmoe.data.run_jobs sets the variable for them).
"""

import os

DATA_WORKER_ENV = "LITMOE_DATA_WORKER"

if os.environ.get(DATA_WORKER_ENV) != "1":
    from litmoe.configs import register_configs

    register_configs()

__version__ = "0.1.0"
