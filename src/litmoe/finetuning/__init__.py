"""Fine-tuning: LitGPT's own fine-tuning loops (full, LoRA, adapter) run with litmoe's MoE layer, on a checkpoint
run_train.py wrote, as it is (finetune.py)."""
