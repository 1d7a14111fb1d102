"""Bad input to the six command lines: each case is one line on stderr naming what is wrong, exit status 2, no
traceback, and nothing on disk changed (data, checkpoints, a user's own files, no half-made output).

The commands run in this process, as their scripts (`runpy`, `__name__ == "__main__"`), so that the table of
cases costs one import of LitGPT instead of one per case. `test_unreadable_files_*` runs a real process.
"""

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL, make_documents

RUN = [
    "--config", "{train_config}", "--model", "{model}", "--data_dir", "{prepared}", "--out_dir", "{out}",
    "--train.max_tokens", "2048", "--train.micro_batch_size", "4", "--train.global_batch_size", "4",
    "--train.max_seq_length", "64", "--num_workers", "0",
]  # fmt: skip
MULTI = [*RUN, "--train.global_batch_size", "16"]  # a whole number of micro-batches on 2 and 4 devices
PREPARE = ["--out_dir", "{out}", "--vocab_size", "300", "--val_fraction", "0.2"]
GENERATE = ["--checkpoint", "{checkpoint}", "--prompt", "The cat", "--max_new_tokens", "3"]
EVALUATE = ["--checkpoints", "[{checkpoint}]", "--max_batches", "1"]
EXPORT = ["--checkpoint", "{checkpoint}", "--out_dir", "{out}"]


def finetune(mode: str, checkpoint: str = "{checkpoint}", data: str = "{instructions}", out: str = "{out}") -> list:
    """finetune.py's arguments for `mode` on LitGPT's JSON data module."""
    json = ["--data", "JSON", "--data.json_path", data, "--data.val_split_fraction", "0.1"]
    return [mode, checkpoint, "--out_dir", out, *json]


def config(argv: list[str], path: str) -> list[str]:
    """`argv` with another train config in place of its own (two --config flags are refused)."""
    return [path if arg == "{train_config}" else arg for arg in argv]


CASES = [
    # finetune.py: refused before the base weights are written
    ("finetune.py", ["tune", "{checkpoint}"], "MODE is full, lora, adapter (got 'tune')"),
    ("finetune.py", [], "MODE is full, lora, adapter (none given)"),
    ("finetune.py", [*finetune("lora"), "--lora_r", "0"], "--lora_r 0: LoRA's rank must be at least 1"),
    ("finetune.py", [*finetune("lora"), "--lora_r", "eight"], 'finetune.py lora: Parser key "lora_r": Expected'),
    ("finetune.py", finetune("full", data="{bad_json}"), "bad_json.jsonl: not JSON (Expecting value, line 2)"),
    ("finetune.py", finetune("full", data="{json_object}"), "expected a list of objects with instruction and"),
    ("finetune.py", finetune("full", data="{nowhere}"), "nowhere: no such file (a .json or .jsonl file"),
    ("finetune.py", finetune("full", checkpoint="{nowhere}"), "CHECKPOINT {nowhere}: no checkpoint there"),
    ("finetune.py", finetune("full", checkpoint="{corrupt}"), "lit_model.pth is incomplete or corrupt"),
    ("finetune.py", finetune("adapter"), "has 2 layers and LitGPT's adapter starts at layer 2, so nothing would"),
    ("finetune.py", finetune("full", out="{checkpoint}"), "--out_dir {checkpoint} is CHECKPOINT {checkpoint}, an"),
    ("finetune.py", [*finetune("full"), "--devices", "0"], "--devices 0: must be at least 1"),
    ("finetune.py", finetune("lora", checkpoint="{small_vocab}"), "its tokenizer has 300 tokens but the model only"),
    ("finetune.py", finetune("full", checkpoint="{tokenizer_garbage}"), "tokenizer.json: not valid JSON"),
    ("finetune.py", [*finetune("lora"), "--train.max_seq_length", "100"], "--train.max_seq_length 100: must be"),
    # a checkpoint whose bytes changed after it was written: every command that loads it
    ("run_train.py", RUN + ["--resume", "{rotted}"], "lit_model.pth does not match its checksum in SHA256SUMS"),
    ("generate.py", ["--checkpoint", "{rotted}", "--prompt", "x"], "lit_model.pth does not match its checksum"),
    ("evaluate.py", ["--checkpoints", "[{rotted}]"], "lit_model.pth does not match its checksum in SHA256SUMS"),
    ("export_hf.py", ["--checkpoint", "{rotted}", "--out_dir", "{out}"], "lit_model.pth does not match its"),
    ("finetune.py", finetune("full", checkpoint="{rotted}"), "lit_model.pth does not match its checksum in"),
    # --verify: checks a folder without running
    ("generate.py", ["--checkpoint", "{nowhere}", "--verify"], "--verify {nowhere}: no such folder"),
    ("evaluate.py", ["--checkpoints", "[{checkpoint},{nowhere}]", "--verify"], "--verify {nowhere}: no such folder"),
    ("prepare_data.py", ["--out_dir", "{nowhere}", "--verify"], "--verify {nowhere}: no such folder"),
    ("run_train.py", RUN[:6] + ["--out_dir", "{nowhere}", "--verify"], "--verify {nowhere}: no such folder"),
    ("export_hf.py", ["--checkpoint", "{checkpoint}"], "--out_dir: give the folder the Hugging Face model goes into"),
    # run_train.py: batch arithmetic and budget
    ("run_train.py", RUN + ["--train.micro_batch_size", "0"], "--train.micro_batch_size 0: must be at least 1"),
    ("run_train.py", RUN + ["--train.micro_batch_size", "-4"], "--train.micro_batch_size -4: must be at least 1"),
    ("run_train.py", RUN + ["--train.global_batch_size", "12", "--train.micro_batch_size", "8"],
     "--train.global_batch_size 12 is not a multiple of --train.micro_batch_size 8; use 8 or 16"),
    ("run_train.py", RUN + ["--train.global_batch_size", "4", "--train.micro_batch_size", "8"],
     "--train.global_batch_size 4 is not a multiple of --train.micro_batch_size 8; use 8 (gradient"),
    ("run_train.py", RUN + ["--devices", "3", "--train.global_batch_size", "16"],
     "--train.micro_batch_size 4 x 3 devices = 12; use 12 or 24 (gradient accumulation makes up the rest)"),
    ("run_train.py", RUN + ["--train.global_batch_size", "0"], "--train.global_batch_size 0: must be at least 1"),
    ("run_train.py", RUN + ["--train.max_tokens", "0"], "--train.max_tokens 0: less than one optimizer step"),
    ("run_train.py", RUN + ["--train.max_tokens", "100"], "(4 sequences x 64 tokens = 256)"),
    ("run_train.py", RUN + ["--train.max_tokens", "null"], "--train.max_tokens None: less than one optimizer step"),
    ("run_train.py", RUN + ["--train.max_tokens", "lots"], "--train.max_tokens lots: expected int or null"),
    ("run_train.py", RUN + ["--train.max_tokens", "2.5e3x"], "--train.max_tokens 2.5e3x: expected int or null"),
    ("run_train.py", RUN + ["--train.max_tokens", "2.55e1"], "--train.max_tokens 25.5: expected int or null"),
    ("run_train.py", RUN + ["--train.max_norm", "null"], "--train.max_norm None: LitGPT's loop clips gradients"),
    ("run_train.py", RUN + ["--train.max_norm", "-1"], "--train.max_norm -1.0: LitGPT's loop clips gradients"),
    ("run_train.py", RUN + ["--train.max_seq_length", "0"], "--train.max_seq_length 0: must be between 1 and"),
    ("run_train.py", RUN + ["--train.max_seq_length", "65"], "--train.max_seq_length 65: must be between 1 and"),
    ("run_train.py", RUN + ["--train.log_interval", "0"], "--train.log_interval 0: must be at least 1"),
    ("run_train.py", RUN + ["--train.save_interval", "0"], "--train.save_interval 0: must be at least 1"),
    ("run_train.py", RUN + ["--train.lr_warmup_steps", "-1"], "--train.lr_warmup_steps -1: must be 0 or more"),
    ("run_train.py", RUN + ["--train.min_lr", "1.0"], "--train.min_lr 1.0: must be between 0 and the optimizer's lr"),
    ("run_train.py", RUN + ["--train.epochs", "2"], "--train.epochs: LitGPT's pretrain loop does not use it"),
    ("run_train.py", RUN + ["--train.max_steps", "10"], "--train.max_steps: LitGPT's pretrain loop does not use it"),
    ("run_train.py", RUN + ["--train.lr_warmup_fraction", "0.1"], "Can't provide both `--train.lr_warmup_fraction`"),
    ("run_train.py", RUN + ["--eval.interval", "0"], "--eval.interval 0: must be at least 1"),
    ("run_train.py", RUN + ["--eval.max_iters", "0"], "--eval.max_iters 0: must be at least 1"),
    # run_train.py: devices, precision, unknown flags
    ("run_train.py", RUN + ["--devices", "0"], "--devices 0: give a positive number of devices per node, or auto"),
    ("run_train.py", RUN + ["--devices", "many"], "--devices many: give a positive number of devices per node"),
    ("run_train.py", RUN + ["--num_nodes", "0"], "--num_nodes 0: must be at least 1"),
    ("run_train.py", RUN + ["--num_workers", "-1"], "--num_workers -1: must be 0"),
    ("run_train.py", RUN + ["--precision", "16-mixed"], "--precision 16-mixed: fp16 needs a CUDA GPU"),
    ("run_train.py", RUN + ["--precision", "fp8"], "--precision fp8: expected one of bf16-true, bf16-mixed, 16-mixed"),
    ("run_train.py", RUN + ["--trian.max_tokens", "10"], "Unrecognized arguments: --trian.max_tokens 10; see --help"),
    ("run_train.py", config(RUN, "{missing}"), "missing.yaml: train config not found"),
    ("run_train.py", config(RUN, "{broken_yaml}"), "broken.yaml: not valid YAML"),
    ("run_train.py", config(RUN, "{unknown_setting}"), "unknown_setting.yaml: unknown setting 'trian"),
    ("run_train.py", RUN + ["--profile", "huge-gpu"], "--profile huge-gpu: {train_config} has no such profile"),
    # run_train.py: the optimizer
    ("run_train.py", RUN + ["--optimizer.init_args.lr", "-1"], "AdamW refuses them (Invalid learning rate: -1"),
    ("run_train.py", RUN + ["--optimizer.lrr", "0.1"], "--optimizer.init_args.lrr: AdamW has no such argument"),
    ("run_train.py", RUN + ["--optimizer", "Adamm"], "--optimizer torch.optim.Adamm: no such torch optimizer"),
    ("run_train.py", RUN + ["--optimizer", '{{"class_path": "AdamW", "init_args": {{"betas": [1.5, 0.9]}}}}'],
     "Invalid beta parameter at index 0: 1.5"),
    ("run_train.py", RUN + ["--optimizer", "[1, 2]"], "--optimizer [1, 2]: expected an optimizer name or mapping"),
    ("run_train.py", RUN + ["--optimizer.init_args.lr"], "--optimizer.init_args.lr needs a value"),
    # run_train.py: the model config
    ("run_train.py", RUN + ["--model", "{model_broken_yaml}"], "model_broken_yaml.yaml: not valid YAML at line"),
    ("run_train.py", RUN + ["--model", "{model_heads}"], "model_heads.yaml: n_head 5 does not divide n_embd 64"),
    ("run_train.py", RUN + ["--model", "{model_groups}"], "n_query_groups 3 does not divide n_head 4"),
    ("run_train.py", RUN + ["--model", "{model_topk}"], "n_expert_per_token 5 with n_expert 4; an MoE layer routes"),
    ("run_train.py", RUN + ["--model", "{model_unknown_key}"], "unknown key 'n_experts'; keys must be fields"),
    ("run_train.py", RUN + ["--model", "{model_type}"], "n_layer is 'two', expected int"),
    ("run_train.py", RUN + ["--model", "{model_zero}"], "vocab_size is 0; it must be a positive integer"),
    ("run_train.py", RUN + ["--model", "Mixtral-9000"], "--model Mixtral-9000: neither a config file nor a registered"),
    ("run_train.py", RUN + ["--model.n_expert_per_token", "99"], "with n_expert_per_token 99: n_expert_per_token 99"),
    ("run_train.py", RUN + ["--model.n_expertz", "4"], "--model.n_expertz: not a field of litgpt.Config"),
    ("run_train.py", RUN + ["--model.n_layer", "two"], "n_layer is 'two', expected int"),
    # run_train.py: starting weights
    ("run_train.py", RUN + ["--initial_checkpoint_dir", "{checkpoint}", "--model.n_layer", "3"],
     "--initial_checkpoint_dir {checkpoint}: another model (n_layer 2 -> 3)"),
    ("run_train.py", RUN + ["--upcycle-from", "{checkpoint}"], "it is LLaMAMoE, not a dense LLaMA-style model"),
    ("run_train.py", RUN + ["--upcycle-from", "{nowhere}"], "--upcycle-from {nowhere}: no model_config.yaml"),
    ("run_train.py", RUN + ["--upcycle-from", "{checkpoint}", "--initial_checkpoint_dir", "{checkpoint}"],
     "--initial_checkpoint_dir and --upcycle-from both give starting weights; choose one"),
    # run_train.py: data and checkpoints
    ("run_train.py", RUN + ["--data_dir", "{nowhere}"], "nowhere/manifest.json not found: prepare the data first"),
    ("run_train.py", RUN + ["--resume", "{corrupt}"], "lit_model.pth is incomplete or corrupt"),
    ("run_train.py", RUN + ["--resume", "{crafted}"], "lit_model.pth is refused: loading it would construct"),
    ("run_train.py", RUN + ["--resume", "auto", "--out_dir", "{corrupt_run}"], "--resume auto: no checkpoint in"),
    ("run_train.py", RUN + ["--out_dir", "{trained}"], "already holds checkpoints (final/); pass --resume auto"),
    ("run_train.py", RUN + ["--strategy", "deepspeed"], "--strategy deepspeed needs a CUDA GPU"),
    ("run_train.py", RUN + ["--flash-attention-force"], "--flash-attention-force: FlashAttention cannot run here"),
    ("run_train.py", RUN + ["--model.block_size", "204800000"],
     "block_size 204,800,000 would allocate a 24 GiB rotary cache when the model is built"),
    ("run_train.py", [("{texts}" if arg == "{prepared}" else arg) for arg in RUN],
     "--data_dir {texts}: this is text, not prepared data; prepare it once with `uv run python prepare_data.py"
     " --source {texts} --out_dir data/texts0`, then train with --data_dir data/texts0"),
    ("run_train.py", RUN + ["--moe.capacity_factor", "0"], "--moe.capacity_factor 0.0: must be above 0 (1.0 = a fair"),
    ("run_train.py", RUN + ["--moe.capacity_factor", "1.25", "--moe.layer", "stock"],
     "--moe.capacity_factor: LitGPT's MoE layer (--moe.layer stock) is dropless only"),
    ("run_train.py", RUN + ["--moe.aux_loss_coef", "-0.01"], "--moe.aux_loss_coef -0.01: must be 0 (off) or more"),
    ("run_train.py", RUN + ["--moe.capacity_factor", ".inf"], "--moe.capacity_factor inf: must be above 0"),
    ("run_train.py", RUN + ["--strategy.expert_parallel", "-2"], "--strategy.expert_parallel -2: must be 1 (every"),
    # run_train.py: expert parallelism
    ("run_train.py", RUN + ["--strategy.expert_parallel", "2"],
     "--strategy.expert_parallel 2: expert parallelism needs several ranks; this run has one (--devices)"),
    ("run_train.py", RUN + ["--strategy.expert_parallel", "0"], "--strategy.expert_parallel 0: must be 1 (every"),
    ("run_train.py", MULTI + ["--devices", "2", "--strategy", "ddp", "--strategy.expert_parallel", "3"],
     "--strategy.expert_parallel 3: must divide the number of ranks (2)"),
    ("run_train.py", MULTI + ["--devices", "4", "--strategy", "ddp", "--strategy.expert_parallel", "4",
                            "--model.n_expert", "6"],
     "--strategy.expert_parallel 4: must divide the model's 6 experts; use one of 2, 3, 6 (and a divisor of the"
     " number of ranks), or 1: every rank holds every expert"),
    ("run_train.py", MULTI + ["--devices", "2", "--strategy", "ddp", "--strategy.expert_parallel", "2",
                            "--moe.layer", "stock"], "(--moe.layer stock) holds every expert; use --moe.layer litmoe"),
    ("run_train.py", RUN + ["--estimate", "--model.n_expert", "1e8"],  # it ran for minutes
     "100,000,000 experts per layer is more than 4,096, which no MoE has"),
    ("run_train.py", RUN + ["--train.max_token", "2e6"],  # an abbreviation is no flag (it was expanded silently)
     "error: Unrecognized arguments: --train.max_token 2e6; see --help for the flags"),
    ("run_train.py", MULTI + ["--optimization.fused_loss", "true", "--strategy", "fsdp", "--devices", "2"],
     "--optimization.fused_loss true: FSDP and ZeRO-3 shard the head's weight, and the loss reads it outside the"
     " model's forward; leave it false"),
    ("run_train.py", RUN + ["--optimization.compile_scope", "layers"],
     "--optimization.compile_scope layers: expected one of model, blocks"),
    ("run_train.py", RUN + ["--compile-mode", "fast"],
     "--optimization.compile_mode fast: expected one of default, reduce-overhead, max-autotune,"),
    # prepare_data.py: nothing a user owns is replaced, even with --force
    ("prepare_data.py", ["--source", "{texts}", "--out_dir", "{user_dir}", "--force"],
     "holds files that are not prepared data (notes.txt); prepare_data.py replaces only what it made"),
    ("prepare_data.py", ["--source", "{texts}", "--out_dir", "{user_dir}"], "holds files that are not prepared data"),
    ("prepare_data.py", ["--source", "{texts}", "--out_dir", "{texts}", "--force"], "is inside --source"),
    ("prepare_data.py", ["--source", "{texts}", "--out_dir", "{texts}/prepared", "--force"], "is inside --source"),
    ("prepare_data.py", ["--source", "{prepared_with_source}/corpus.jsonl", "--out_dir", "{prepared_with_source}",
                         "--force"], "is inside --out_dir"),
    ("prepare_data.py", ["--source", "{texts}", "--out_dir", "{texts}/doc000.txt"], "doc000.txt is a file"),
    # prepare_data.py: sources
    ("prepare_data.py", ["--source", "{nowhere}", *PREPARE], "nowhere: no such file or folder"),
    ("prepare_data.py", ["--source", "{empty_dir}", *PREPARE], "empty_dir: no data files found"),
    ("prepare_data.py", ["--source", "{latin1}", *PREPARE], "latin1.txt: not UTF-8 text (invalid continuation byte"),
    ("prepare_data.py", ["--source", "{bad_json}", *PREPARE], "bad_json.jsonl:2: not valid JSON"),
    ("prepare_data.py", ["--source", "{no_text}", *PREPARE], "no_text.jsonl:2: record has no 'text' string"),
    ("prepare_data.py", ["--source", "{bad_chat}", *PREPARE], "bad_chat.jsonl:1: a message's role must be a non-empty"),
    ("prepare_data.py", ["--source", "{empty_jsonl}", *PREPARE], "no document fell into the train split"),
    ("prepare_data.py", ["--source", "{one_paragraph}", *PREPARE], "no document fell into the val split"),
    ("prepare_data.py", ["--source", "{csv}", *PREPARE], "unsupported file type '.csv'"),
    ("prepare_data.py", ["--source", "{texts}", *PREPARE, "--val_fraction", "0"], "--val_fraction 0.0: must be"),
    ("prepare_data.py", ["--source", "{texts}", *PREPARE, "--vocab_size", "100"], "--vocab_size 100: a byte-level BPE"),
    ("prepare_data.py", ["--source", "{texts}", *PREPARE, "--tokenizer_dir", "{nowhere}"], "does not exist"),
    ("prepare_data.py", ["--source", "{texts}", *PREPARE, "--force", "maybe"], "--force maybe: expected bool"),
    # generate.py
    ("generate.py", GENERATE + ["--num_samples", "0"], "--num_samples 0: must be at least 1"),
    ("generate.py", GENERATE + ["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    ("generate.py", GENERATE + ["--max_new_tokens", "-5"], "--max_new_tokens -5: must be at least 1"),
    ("generate.py", GENERATE + ["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy decoding) or more"),
    ("generate.py", GENERATE + ["--temperature", "nan"], "--temperature nan: expected float"),
    ("generate.py", GENERATE + ["--top_p", "1.5"], "--top_p 1.5: must be above 0 and at most 1"),
    ("generate.py", GENERATE + ["--devices", "0"], "--devices 0: must be at least 1"),
    ("generate.py", GENERATE + ["--devices", "3"], "--devices 3: tensor parallelism splits the model's n_head (4)"
     " evenly across the devices; use --devices 1 or 2"),
    ("generate.py", GENERATE + ["--top_p", "0"], "--top_p 0.0: must be above 0"),
    ("generate.py", GENERATE + ["--top_k", "0"], "--top_k 0: must be at least 1"),
    ("generate.py", GENERATE + ["--checkpoint", "{nowhere}"], "nowhere: no such checkpoint directory"),
    ("generate.py", GENERATE + ["--checkpoint", "{corrupt}"], "lit_model.pth is incomplete or corrupt"),
    ("generate.py", GENERATE + ["--checkpoint", "{crafted}"], "lit_model.pth is refused: loading it would construct"),
    ("generate.py", GENERATE + ["--checkpoint", "{no_config}"], "not a complete checkpoint (missing model_config"),
    ("generate.py", GENERATE + ["--checkpoint", "{small_vocab}"], "tokenizer has 300 tokens but the model only 128"),
    ("generate.py", GENERATE + ["--prompt_file", "{nowhere}"], "give either --prompt or --prompt_file, not both"),
    ("generate.py", GENERATE[:2] + ["--prompt_file", "{nowhere}"], "--prompt_file {nowhere}: no such file"),
    ("generate.py", GENERATE + ["--prompt", "The cat sees a red ball. " * 20], "exceeds the model's block size of 64"),
    ("generate.py", GENERATE + ["--precision", "fp8"], "--precision fp8: expected one of bf16-true, 16-true, 32-true"),
    # evaluate.py
    ("evaluate.py", EVALUATE + ["--data_dir", "{other_prepared}"], "prepared with another tokenizer than"),
    ("evaluate.py", EVALUATE + ["--data_dir", "{nowhere}"], "nowhere: no manifest.json; pass data made by"),
    ("evaluate.py", EVALUATE + ["--checkpoints", "[{nowhere}]"], "nowhere: no such checkpoint directory"),
    ("evaluate.py", EVALUATE + ["--checkpoints", "[{crafted}]"], "lit_model.pth is refused"),
    ("evaluate.py", EVALUATE + ["--checkpoints", "[]"], "--checkpoints is empty"),
    ("evaluate.py", EVALUATE + ["--file", "{nowhere}"], "--file {nowhere}: no such file"),
    ("evaluate.py", EVALUATE + ["--file", "{empty_jsonl}"], "no text to evaluate"),
    ("evaluate.py", EVALUATE + ["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    ("evaluate.py", EVALUATE + ["--seq_length", "-3"], "--seq_length -3: must be at least 1"),
    ("evaluate.py", EVALUATE + ["--max_batches", "0"], "--max_batches 0: must be at least 1"),
    ("evaluate.py", EVALUATE + ["--out", "{nowhere}/results.json"], "results.json: give a file path in an existing"),
    ("evaluate.py", EVALUATE + ["--out", "{out}.png"],
     ".png: give the results' .json path; the figure goes beside it as .png"),
    ("evaluate.py", EVALUATE + ["--tasks", "hellaswag"], "--tasks needs lm-eval-harness"),
    # export_hf.py
    ("export_hf.py", EXPORT + ["--checkpoint", "{corrupt}"], "lit_model.pth is incomplete or corrupt"),
    ("export_hf.py", EXPORT + ["--checkpoint", "{crafted}"], "lit_model.pth is refused"),
    ("export_hf.py", EXPORT + ["--checkpoint", "{nowhere}"], "nowhere: no such checkpoint directory"),
    ("export_hf.py", EXPORT + ["--out_dir", "{user_dir}"], "user_dir is not empty; choose a new directory"),
    ("export_hf.py", EXPORT + ["--out_dir", "{user_dir}/notes.txt"], "notes.txt is a file; give a directory"),
    ("export_hf.py", EXPORT + ["--out_dirr", "x"], "Unrecognized arguments: --out_dirr x"),
    # no output over an input, into a checkpoint or prepared data, or over a file the command did not write
    ("evaluate.py", EVALUATE + ["--out", "{checkpoint}/lit_model.pth"],
     "--out {checkpoint}/lit_model.pth is inside the checkpoint directory {checkpoint}"),
    ("evaluate.py", EVALUATE + ["--out", "{checkpoint}/results.json"], "is inside the checkpoint directory"),
    ("evaluate.py", EVALUATE + ["--out", "{prepared}/results.json"], "is inside the prepared-data directory"),
    ("evaluate.py", EVALUATE + ["--file", "{one_paragraph}", "--out", "{one_paragraph}"],
     "--out {one_paragraph} is --file {one_paragraph}, an input; choose another path"),
    ("evaluate.py", EVALUATE + ["--out", "{user_dir}/notes.txt"],
     "notes.txt exists and this command did not write it; choose a new path or pass --force"),
    ("evaluate.py", EVALUATE + ["--out", "{user_dir}"], "user_dir is a directory; give a file path"),
    ("export_hf.py", EXPORT + ["--out_dir", "{checkpoint}/hf"], "is inside the checkpoint directory"),
    ("export_hf.py", EXPORT + ["--out_dir", "{prepared}/hf"], "is inside the prepared-data directory"),
    ("export_hf.py", EXPORT + ["--out_dir", ""], "--out_dir '': give a path"),
    ("run_train.py", RUN + ["--out_dir", "{prepared}/run"], "is inside the prepared-data directory {prepared}"),
    ("run_train.py", RUN + ["--out_dir", "{checkpoint}"], "is inside the checkpoint directory {checkpoint}"),
    ("run_train.py", RUN + ["--out_dir", "{user_dir}/notes.txt"], "notes.txt is a file; give a directory"),
    ("run_train.py", RUN + ["--out_dir", ""], "--out_dir '': give a path"),
    ("prepare_data.py", ["--source", "{texts}", "--out_dir", "{checkpoint}/data"], "is inside the checkpoint"),
    ("prepare_data.py", ["--source", "{texts}", "--out_dir", "{prepared}/tokenizer", "--force"],
     "is inside the prepared-data directory {prepared}"),
    # every user file read one guarded way: YAML, JSON, tokenizer, checkpoint config
    ("run_train.py", config(RUN, "{duplicate_keys}"), "the key 'train' is given twice; keep one"),
    ("run_train.py", config(RUN, "{section_scalar}"), "section_scalar.yaml: `train:` is 5, not a mapping of"),
    ("run_train.py", RUN + ["--config", "{duplicate_keys}"],
     "--config given twice ({train_config}, {duplicate_keys}); give one, and override its settings with flags"),
    ("run_train.py", RUN + ["--config="], "--config needs a value"),
    ("run_train.py", RUN + ["--moe", "stock"],
     "--moe stock: --moe takes a YAML file of moe: settings; to set one, write --moe."),
    ("run_train.py", RUN + ["--moe", "{model}"], "--moe takes a YAML file of moe: settings; to set one, write"),
    ("run_train.py", RUN + ["--optimizer.init_args.lr", "nan"],
     "--optimizer.init_args.lr nan: expected a finite number (default 0.001)"),
    ("run_train.py", RUN + ["--optimizer.init_args.weight_decay", ".inf"],
     "--optimizer.init_args.weight_decay inf: expected a finite number"),
    ("run_train.py", RUN + ["--model", "{model_python_tag}"], "model_python_tag.yaml: not valid YAML at line 1"),
    ("run_train.py", RUN + ["--model.n_layer", "[2"], "--model.n_layer [2: not a valid value"),
    ("run_train.py", RUN + ["--optimizer.betas", "[0.9,"], "--optimizer.betas [0.9,: not a valid value"),
    ("run_train.py", RUN + ["--initial_checkpoint_dir", "{config_empty}"],
     "config_empty/model_config.yaml: expected a mapping of litgpt.Config fields"),
    ("run_train.py", RUN + ["--strategy", "deepspeed", "--deepspeed-config", "{ds_expert_parallel}"],
     "remove expert_parallel; DeepSpeed's AutoEP would replace litmoe's MoE layer"),
    ("generate.py", GENERATE + ["--checkpoint", "{config_empty}"], "model_config.yaml: expected a mapping of"),
    ("generate.py", GENERATE + ["--checkpoint", "{config_broken}"], "model_config.yaml: not valid YAML at line"),
    ("generate.py", GENERATE + ["--checkpoint", "{config_python_tag}"], "model_config.yaml: not valid YAML at line 1"),
    ("generate.py", GENERATE + ["--checkpoint", "{config_disagrees}"],
     "the weights do not match its model_config.yaml"),
    ("generate.py", GENERATE + ["--checkpoint", "{tokenizer_garbage}"],
     "tokenizer.json: not valid JSON at line 1"),
    ("generate.py", GENERATE + ["--checkpoint", "{tokenizer_no_bos}"], "needs both bos_token and eos_token"),
    ("generate.py", GENERATE[:2] + ["--prompt_file", "{latin1}"], "--prompt_file {latin1}: not UTF-8 text"),
    ("generate.py", GENERATE + ["--checkpoint", "{zero_traversal}"],
     "its latest file names '../../../outside', not a folder inside lit_model.pth/"),
    ("evaluate.py", EVALUATE + ["--checkpoints", "{tokenizer_garbage}"], "tokenizer.json: not valid JSON"),
    ("run_train.py", RUN + ["--seed", "-1"], "--seed -1: must be between 0 and 4294967295"),
    ("generate.py", GENERATE + ["--seed", str(2**70)], f"--seed {2**70}: must be between 0 and 4294967295"),
    ("run_train.py", RUN + ["--resume", "{weights_only}"],
     "lit_model.pth: weights only, without the optimizer and progress a run resumes"),
    # weights that load but are not a model's: found at load, before a prompt is echoed or a file written
    ("generate.py", GENERATE + ["--checkpoint", "{weights_not_tensors}"], "its weights must map parameter names to"),
    ("evaluate.py", EVALUATE + ["--checkpoints", "{weights_integer}"], "holds torch.int64 values, not floating-point"),
    ("generate.py", GENERATE + ["--checkpoint", "{weights_nan}"], "holds NaN or infinite values (a diverged or"),
    ("export_hf.py", EXPORT + ["--checkpoint", "{weights_nan}"], "holds NaN or infinite values"),
    ("evaluate.py", EVALUATE + ["--file", "{texts}"], "--file {texts}: a directory; give one .txt or .jsonl file"),
    ("evaluate.py", EVALUATE + ["--checkpoints", "[{checkpoint},{checkpoint}/]"],
     "--checkpoints: {checkpoint} is given twice; give each checkpoint once"),
    ("evaluate.py", EVALUATE + ["--checkpoints", "[{checkpoint},,{checkpoint}]"],
     "not a list of paths (an empty member, or a space?); write [DIR1,DIR2]"),
    ("export_hf.py", EXPORT + ["--checkpoint", "{config_disagrees}"], "config_disagrees"),
    ("prepare_data.py", ["--source", "{texts}", "--tokenizer_dir", "{tokenizer_garbage}", *PREPARE],
     "tokenizer.json: not valid JSON"),
    ("run_train.py", RUN + ["--initial_checkpoint_dir", "{other_tokenizer}"],
     "--initial_checkpoint_dir {other_tokenizer}: its tokenizer is not the one the data was prepared with"),
    ("run_train.py", RUN + ["--upcycle-from", "{other_tokenizer}"], "its token ids would mean other tokens"),
    # prepared data damaged after it was made: found at start, not mid-run
    ("run_train.py", RUN + ["--data_dir", "{prepared_truncated}"],
     "chunk-0-0-0.bin: 1,000 bytes where the index records"),
    ("run_train.py", RUN + ["--data_dir", "{prepared_missing}"], "chunk-0-0-0.bin: missing from the prepared data"),
    ("run_train.py", RUN + ["--data_dir", "{prepared_foreign_manifest}"],
     "manifest.json: not a manifest prepare_data.py wrote (it holds ['foo']); prepare the data again"),
    ("evaluate.py", EVALUATE + ["--data_dir", "{prepared_missing_val}"], "missing from the prepared data; prepare"),
    ("run_train.py", RUN + ["--data_dir", "{prepared_small_files}"],
     "too few for one micro-batch of 4 windows of 65 tokens (windows do not span chunks"),
    # --data_dir as the user wrote it
    ("run_train.py", RUN + ["--data_dir", "{prepared}:inf,{other_prepared}:1"],
     "weight inf of {prepared}: weights must be positive numbers"),
    ("run_train.py", RUN + ["--data_dir", "{prepared}:heavy,{other_prepared}:1"],
     "--data_dir {prepared}:heavy,{other_prepared}:1: 'heavy' is not a weight"),
    ("run_train.py", RUN + ["--data_dir", "{prepared}:-1,{other_prepared}:1"], "weight -1 of {prepared}"),
    ("run_train.py", RUN + ["--data_dir", "{prepared},{prepared}"], "a directory appears twice"),
    ("run_train.py", RUN + ["--data_dir", "{prepared},"], "an empty entry (a stray comma?); write DIR or DIR:WEIGHT"),
    ("run_train.py", RUN + ["--data_dir", "{prepared}:1e308,{other_prepared}:1e308"],
     "the weights add up past a float's range; give proportions"),
    ("run_train.py", RUN + ["--moe.layer", "stock", "--moe.bias_update_rate", "0.001"],
     "--moe.bias_update_rate: LitGPT's MoE layer (--moe.layer stock) has no selection bias"),
    ("run_train.py", RUN + ["--out_dir", "/"], "--out_dir / is the root directory; give a directory of its own"),
    # --estimate checks what does not depend on this machine or the data, as a run would
    ("run_train.py", RUN + ["--estimate", "--num_nodes", "-1"], "--num_nodes -1: must be at least 1"),
    ("run_train.py", RUN + ["--estimate", "--checkpoint.keep_last", "-1"], "--checkpoint.keep_last -1: keep at"),
    ("run_train.py", RUN + ["--estimate", "--health.spike_window", "0"], "--health.spike_window 0: must be positive"),
    ("run_train.py", RUN + ["--estimate", "--seed", "-5"], "--seed -5: must be between 0 and 4294967295"),
    # validation data that would also train
    ("prepare_data.py", ["--source", "{texts}", "--val_source", "{texts}", *PREPARE],
     "--val_source {texts} is --source {texts}: its documents would train too"),
    ("prepare_data.py", ["--source", "{texts}", "--val_source", "{texts}/doc000.txt", *PREPARE],
     "is inside --source {texts}: its documents would train too"),
    ("prepare_data.py", ["--source", "{texts}/*.txt", "--val_source", "{texts}/doc000.txt", *PREPARE],
     "--val_source {texts}/doc000.txt: 1 of its files ({texts}/doc000.txt) are also read by --source {texts}/*.txt"),
    ("prepare_data.py", ["--source", "tinystories", "--cache_dir", "{csv}", *PREPARE],
     "--cache_dir {csv} is a file; give a directory to keep downloaded sources in"),
    # sources that are not what they seem, and paths that are not one line
    ("prepare_data.py", ["--source", "{fifo}", *PREPARE], "--source {fifo}: not a regular file (a pipe, socket or"),
    ("prepare_data.py", ["--source", "{out}/no\nsuch", *PREPARE], "{out}/no\\nsuch: no such file or folder"),
    ("prepare_data.py", ["--source", "{texts}", *PREPARE, "--out_dir", "{scratch_owner}"],
     "prepare_data.py builds --out_dir mine in this path, but it holds something a preparation did not make"),
]  # fmt: skip


class Crafted:
    """What a malicious checkpoint pickles: unpickling it calls os.mkdir (any function would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def model_file(folder: Path, name: str, **changes: object) -> Path:
    lines = [line for line in TINY_MODEL.splitlines() if line.split(":")[0] not in changes]
    lines += [f"{key}: {value}" for key, value in changes.items()]
    return write(folder / f"{name}.yaml", "\n".join(lines) + "\n")


def checkpoint_copy(trained: Path, target: Path, weights: bytes | None = None) -> Path:
    """A checkpoint made by hand from the trained one: without SHA256SUMS, as one another tool wrote, so that each
    case meets the check it is about (a checksum mismatch would be found first otherwise)."""
    shutil.copytree(trained / "final", target, ignore=shutil.ignore_patterns("SHA256SUMS"))
    if weights is not None:
        (target / "lit_model.pth").write_bytes(weights)
    return target


@pytest.fixture(scope="module")
def world(tmp_path_factory, text_folder, prepared, trained, tiny_model_file) -> dict[str, Path]:
    """Everything the cases point at: good data and checkpoints, and each kind of bad input."""
    from litmoe.data.prepare import prepare

    root = tmp_path_factory.mktemp("world")
    paths = {"train_config": REPO / "train_config.yaml", "model": tiny_model_file, "prepared": prepared,
             "texts": text_folder, "trained": trained, "checkpoint": trained / "final", "out": root / "out",
             "nowhere": root / "nowhere", "missing": root / "missing.yaml"}  # fmt: skip
    paths["broken_yaml"] = write(root / "broken.yaml", "train: [unclosed\n")
    paths["unknown_setting"] = write(root / "unknown_setting.yaml", "trian:\n  max_tokens: 100\n")
    models = root / "models"
    paths["model_broken_yaml"] = write(models / "model_broken_yaml.yaml", "name: x\nn_layer: [2\n")
    paths["model_heads"] = model_file(models, "model_heads", n_head=5, n_query_groups=5)
    paths["model_groups"] = model_file(models, "model_groups", n_query_groups=3)
    paths["model_topk"] = model_file(models, "model_topk", n_expert_per_token=5)
    paths["model_unknown_key"] = model_file(models, "model_unknown_key", n_experts=4)
    paths["model_type"] = model_file(models, "model_type", n_layer="two")
    paths["model_zero"] = model_file(models, "model_zero", vocab_size=0)

    paths["user_dir"] = write(root / "user_dir" / "notes.txt", "my own notes, not prepared data\n").parent
    paths["prepared_with_source"] = root / "prepared_with_source"
    shutil.copytree(prepared, paths["prepared_with_source"])
    write(paths["prepared_with_source"] / "corpus.jsonl", '{"text": "mine"}\n')
    paths["empty_dir"] = root / "empty_dir"
    paths["empty_dir"].mkdir()
    paths["latin1"] = write(root / "latin1.txt", "café au lait".encode("latin-1"))
    paths["bad_json"] = write(root / "bad_json.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    paths["no_text"] = write(root / "no_text.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    paths["bad_chat"] = write(root / "bad_chat.jsonl", json.dumps({"messages": [{"role": 5, "content": None}]}))
    paths["empty_jsonl"] = write(root / "empty_jsonl.jsonl", "\n")
    paths["one_paragraph"] = write(root / "one_paragraph.txt", make_documents(1, 30, seed=5)[0])
    paths["csv"] = write(root / "table.csv", "a,b\n")
    examples = [{"instruction": "Say 1.", "input": "", "output": "The number is 1."}] * 4
    paths["instructions"] = write(root / "instructions.json", json.dumps(examples))
    paths["json_object"] = write(root / "object.json", '{"instruction": "not in a list"}')
    paths["other_prepared"] = root / "other_prepared"
    prepare(source=str(text_folder), out_dir=paths["other_prepared"], vocab_size=280, val_fraction=0.2)

    checkpoint = (trained / "final" / "lit_model.pth").read_bytes()
    paths["corrupt"] = checkpoint_copy(trained, root / "corrupt", weights=checkpoint[: len(checkpoint) // 2])
    paths["crafted"] = checkpoint_copy(trained, root / "crafted")
    torch.save({"model": Crafted(root / "crafted-code-ran")}, paths["crafted"] / "lit_model.pth")
    paths["no_config"] = checkpoint_copy(trained, root / "no_config")
    (paths["no_config"] / "model_config.yaml").unlink()
    paths["small_vocab"] = checkpoint_copy(trained, root / "small_vocab")
    config = paths["small_vocab"] / "model_config.yaml"
    config.write_text(config.read_text().replace("padded_vocab_size: 320", "padded_vocab_size: 128"))
    paths["duplicate_keys"] = write(
        root / "duplicate_keys.yaml", "train:\n  max_tokens: 2048\ntrain:\n  log_interval: 1\n"
    )
    paths["section_scalar"] = write(root / "section_scalar.yaml", "train: 5\n")
    paths["model_python_tag"] = write(models / "model_python_tag.yaml", "name: !!python/object/apply:os.getcwd []\n")
    paths["ds_expert_parallel"] = write(root / "ds.json", '{"expert_parallel": {"enabled": true, "autoep_size": 2}}')
    for name, text in (("config_empty", ""), ("config_broken", "n_layer: [2\n"),
                       ("config_python_tag", "name: !!python/object/apply:os.getcwd []\n")):  # fmt: skip
        (checkpoint_copy(trained, root / name) / "model_config.yaml").write_text(text)
    paths.update({name: root / name for name in ("config_empty", "config_broken", "config_python_tag")})
    paths["config_disagrees"] = checkpoint_copy(trained, root / "config_disagrees")
    config = paths["config_disagrees"] / "model_config.yaml"
    config.write_text(config.read_text().replace("n_layer: 2", "n_layer: 1"))
    paths["tokenizer_garbage"] = checkpoint_copy(trained, root / "tokenizer_garbage")
    (paths["tokenizer_garbage"] / "tokenizer.json").write_text("<html>not a tokenizer</html>")
    paths["tokenizer_no_bos"] = checkpoint_copy(trained, root / "tokenizer_no_bos")
    settings = json.loads((paths["tokenizer_no_bos"] / "tokenizer_config.json").read_text())
    (paths["tokenizer_no_bos"] / "tokenizer_config.json").write_text(json.dumps(settings | {"bos_token": None}))
    paths["other_tokenizer"] = checkpoint_copy(trained, root / "other_tokenizer")  # same size, other ids
    (paths["other_tokenizer"] / "tokenizer_config.json").write_text(json.dumps(settings | {"model_max_length": 7}))
    for name in ("prepared_truncated", "prepared_missing", "prepared_missing_val", "prepared_foreign_manifest"):
        paths[name] = root / name
        shutil.copytree(prepared, paths[name])
    chunk = paths["prepared_truncated"] / "train" / "chunk-0-0-0.bin"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    (paths["prepared_missing"] / "train" / "chunk-0-0-0.bin").unlink()
    (paths["prepared_foreign_manifest"] / "manifest.json").write_text('{"foo": 1}')
    (paths["prepared_missing_val"] / "val" / "chunk-0-0-0.bin").unlink()
    small_files = root / "small_files"  # each file its own shard and chunks: no chunk holds a 65-token window
    for index, document in enumerate(make_documents(count=160, sentences=1, seed=9)):
        write(small_files / f"part{index:03d}.jsonl", json.dumps({"text": document}) + "\n")
    paths["prepared_small_files"] = root / "prepared_small_files"
    prepare(source=str(small_files), out_dir=paths["prepared_small_files"], tokenizer_dir=prepared / "tokenizer",
            val_fraction=0.2)  # fmt: skip
    paths["zero_traversal"] = checkpoint_copy(trained, root / "zero_traversal")
    shards = paths["zero_traversal"] / "lit_model.pth"
    shards.unlink()
    write(shards / "checkpoint" / "mp_rank_00_model_states.pt", checkpoint)
    write(shards / "latest", "../../../outside")
    paths["fifo"] = root / "pipes" / "stream.txt"  # nobody writes to it: reading it would wait forever
    paths["fifo"].parent.mkdir()
    os.mkfifo(paths["fifo"])
    paths["scratch_owner"] = root / "mine"  # prepare_data.py would build it in .mine.partial, the user's own folder
    paths["user_scratch"] = write(root / ".mine.partial" / "important.txt", "my notes\n").parent
    weights = torch.load(trained / "final" / "lit_model.pth", weights_only=True)["model"]
    for name, damaged in (
        ("weights_only", weights),
        ("weights_not_tensors", [1, 2, 3]),
        ("weights_integer", {key: tensor.long() for key, tensor in weights.items()}),
        ("weights_nan", {**weights, "lm_head.weight": weights["lm_head.weight"] * float("nan")}),
    ):
        paths[name] = checkpoint_copy(trained, root / name)
        torch.save(damaged if name == "weights_only" else {"model": damaged}, paths[name] / "lit_model.pth")
    paths["rotted"] = root / "rotted"  # a byte flipped inside the weights, its SHA256SUMS kept: still a valid zip
    shutil.copytree(trained / "final", paths["rotted"])
    rotted = bytearray(checkpoint)
    rotted[len(rotted) // 2] ^= 0x01
    (paths["rotted"] / "lit_model.pth").write_bytes(rotted)
    paths["corrupt_run"] = root / "corrupt_run"
    checkpoint_copy(trained, paths["corrupt_run"] / "step-00000004", weights=checkpoint[:1000])
    return paths


def snapshot(roots: list[Path]) -> dict[str, tuple]:
    """Every file and directory under the roots, with size, modification time and content hash."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if path.is_file():
                stat = path.stat()
                state[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.md5(path.read_bytes()).digest())
            else:
                state[str(path)] = ("dir", sorted(entry.name for entry in path.iterdir()))
    return state


def run_script(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The command line as a user runs it (its `__main__` block), in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with warnings.catch_warnings(record=True) as caught:  # a real process would print them on stderr
        warnings.simplefilter("always")
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
            status = 0
        except SystemExit as exit:
            status = exit.code
    out, err = capsys.readouterr()
    return status, out, err + "".join(f"{warning.category.__name__}: {warning.message}\n" for warning in caught)


@pytest.mark.parametrize(("script", "argv", "message"), CASES, ids=[f"{i:03d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(script, argv, message, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # defaults such as data/default resolve here, not in the repository
    argv = [arg.format(**world) for arg in argv]
    roots = [path for path in world.values() if path.is_dir()] + [world["out"], world["nowhere"]]
    before = snapshot(roots)
    status, out, err = run_script(script, argv, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert message.format(**world) in lines[0]
    assert snapshot(roots) == before
    assert not list(tmp_path.iterdir())  # no output, scratch or partial directory left in the working directory
    if script == "generate.py":
        assert out == ""  # refused before the prompt is echoed


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("WORLD_SIZE", "abc", "environment variable WORLD_SIZE='abc': not a whole number; unset it"),
        ("LOCAL_RANK", "-1", "environment variable LOCAL_RANK='-1': not a whole number"),
        ("WORLD_SIZE", "4", "environment variable WORLD_SIZE=4, but this run has 1 rank(s) (--devices x --num_nodes)"),
        ("RANK", "3", "environment variable RANK=3, but the ranks are 0 to 0: unset it (left from a launcher?)"),
        ("NODE_RANK", "1", "environment variable NODE_RANK=1, but the ranks are 0 to 0: unset it"),
        ("NNODES", "2", "environment variable NNODES=2, but this run has 1 (--num_nodes): give --num_nodes 2, or"),
        ("LOCAL_WORLD_SIZE", "4", "environment variable LOCAL_WORLD_SIZE=4, but this run has 1 (--devices): give"),
        (
            "LOCAL_RANK",
            "1",
            "environment variable LOCAL_RANK=1, but this run has 1 rank: a rank other than 0 skips the"
            " lock on --out_dir (another run could write into it)",
        ),  # fmt: skip
    ],
)
def test_launcher_variables_left_in_the_environment_are_one_line(variable, value, message, world, tmp_path,
                                                                 monkeypatch, capsys):  # fmt: skip
    """A shell left from a torchrun job keeps WORLD_SIZE: litdata would split the data for ranks that do not exist."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    status, _, err = run_script("run_train.py", [arg.format(**world) for arg in RUN], monkeypatch, capsys)
    assert status == 2 and err.strip().splitlines() == [f"error: {err.strip()[7:]}"] and message in err, err[-2000:]
    assert not list(tmp_path.iterdir())


def test_where_the_ranks_meet_is_checked_before_any_work(world, tmp_path, monkeypatch, capsys):
    """An unresolvable MASTER_ADDR had every rank retry it until the timeout; a port another process holds failed
    rank 0's store after the other ranks were started, and left them waiting; a stale RANK made the launching
    process skip the lock on --out_dir (two runs could write one folder)."""
    import socket

    monkeypatch.chdir(tmp_path)
    argv = [arg.format(**world) for arg in MULTI] + ["--devices", "2", "--strategy", "ddp"]
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        cases = {
            ("nosuchhost.invalid", "29500"): "MASTER_ADDR=nosuchhost.invalid: the host name does not resolve",
            ("127.0.0.1", "port"): "MASTER_PORT='port': not a port (1 to 65535); unset it or fix it",
            ("127.0.0.1", str(busy.getsockname()[1])): "the port is in use on this host (another run?); choose a",
        }
        for (address, port), message in cases.items():
            monkeypatch.setenv("MASTER_ADDR", address)
            monkeypatch.setenv("MASTER_PORT", port)
            status, _, err = run_script("run_train.py", argv, monkeypatch, capsys)
            assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err[-2000:]
    # a global rank left in the shell: the launching process would think itself rank 1 and skip the out_dir lock
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("RANK", "1")
    status, _, err = run_script("run_train.py", argv, monkeypatch, capsys)
    assert status == 2 and "environment variable RANK=1 without MASTER_ADDR: no launcher started this process" in err
    assert not list(tmp_path.iterdir()) and not world["out"].exists()


def test_several_nodes_without_a_launcher_are_one_line(world, tmp_path, monkeypatch, capsys):
    """Without MASTER_ADDR (or a cluster launcher) each node would wait alone for the others until the timeout."""
    from litmoe.distributed.strategy import CLUSTER_VARIABLES

    monkeypatch.chdir(tmp_path)
    for variable in CLUSTER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    argv = [arg.format(**world) for arg in RUN] + ["--num_nodes", "2", "--train.global_batch_size", "8"]
    status, _, err = run_script("run_train.py", argv, monkeypatch, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "--num_nodes 2: the nodes meet at MASTER_ADDR, and nothing set it; launch with" in err
    assert not list(tmp_path.iterdir())


def test_enough_cases_for_every_command():
    scripts = [script for script, _, _ in CASES]
    assert len(CASES) >= 60
    assert {script: scripts.count(script) >= 5 for script in set(scripts)} == dict.fromkeys(
        ["run_train.py", "prepare_data.py", "generate.py", "evaluate.py", "export_hf.py", "finetune.py"], True
    )


def test_unreadable_files_are_one_line_in_a_real_process(tmp_path):
    """A file or folder the user cannot read (as root, with the capabilities that read everything dropped)."""
    root = tmp_path
    try:
        for name, text in (("a.txt", "readable " * 50), ("b.txt", "secret " * 50)):
            (root / "docs" / name).parent.mkdir(exist_ok=True)
            (root / "docs" / name).write_text(text)
        (root / "docs" / "b.txt").chmod(0o000)
        (root / "locked" / "inner").mkdir(parents=True)
        (root / "locked").chmod(0o000)
        for source, message in (("docs", "docs/b.txt: cannot read it (permission denied)"),
                                ("locked", "locked: cannot read this folder (Permission denied)")):  # fmt: skip
            result = run_unprivileged([sys.executable, str(REPO / "prepare_data.py"), "--source", str(root / source),
                                       "--out_dir", str(root / "out")])  # fmt: skip
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
            assert sorted(os.listdir(root)) == ["docs", "locked"]
    finally:
        (root / "locked").chmod(0o755)


def run_unprivileged(command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` where file permissions apply: as root, without the capabilities that bypass them."""

    def drop_permission_override() -> None:
        import ctypes

        prctl, capability_bounding_set_drop = ctypes.CDLL(None, use_errno=True).prctl, 24
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (gone from the exec'd process)
            if prctl(capability_bounding_set_drop, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    demote = drop_permission_override if os.geteuid() == 0 else None
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, preexec_fn=demote, timeout=300)


def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path, prepared, tiny_model_file):
    """--out_dir under a folder the user may not write to: each command says so in one line, at once."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "book.txt").write_text("A sentence of text. " * 200)
    locked.chmod(0o555)
    run = ["--config", str(REPO / "train_config.yaml"), "--model", str(tiny_model_file), "--data_dir", str(prepared),
           "--train.max_tokens", "2048", "--train.micro_batch_size", "4", "--train.global_batch_size", "4",
           "--train.max_seq_length", "64", "--num_workers", "0"]  # fmt: skip
    commands = {
        "run_train.py": [*run, "--out_dir", str(locked / "run")],
        "prepare_data.py": ["--source", str(tmp_path / "book.txt"), "--out_dir", str(locked / "data")],
    }
    try:
        for script, argv in commands.items():
            result = run_unprivileged([sys.executable, str(REPO / script), *argv])
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, (script, result.stderr[-2000:])
            assert str(locked) in lines[0] and "permission denied" in lines[0].lower(), (script, lines[0])
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)
