"""A training run: run_train.py's command line, the checks and resume point, LitGPT's pretrain loop with
our patches, and what keeps a long run alive (atomic saves, preemption, health, monitoring)."""
