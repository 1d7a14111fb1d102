import io
import re
import sys

import pytest
import torch

from litmoe.inference.generate import generate, generate_tokens, stream_text
from litmoe.inference.loading import load_model, resolve_checkpoint_dir


def test_greedy_matches_full_forward_argmax(trained):
    model, tokenizer = load_model(trained / "final", torch.device("cpu"), torch.float32)
    prompt = tokenizer.encode("The cat sees", bos=True)
    cached = list(generate_tokens(model, prompt, 20, temperature=0.0, top_k=None, top_p=1.0, eos_id=-1))
    assert len(cached) == 20
    # the same tokens from a plain forward over the whole sequence each step, no KV cache
    sequence = prompt.tolist()
    with torch.no_grad():
        for _ in range(20):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert cached == sequence[prompt.numel() :]
    again = list(generate_tokens(model, prompt, 20, temperature=0.0, top_k=None, top_p=1.0, eos_id=-1))
    assert again == cached  # deterministic


def test_generation_stops_at_eos(trained):
    model, tokenizer = load_model(trained / "final", torch.device("cpu"), torch.float32)
    prompt = tokenizer.encode("A dog likes", bos=True)
    greedy = list(generate_tokens(model, prompt, 40, temperature=0.0, top_k=None, top_p=1.0, eos_id=-1))
    stop = greedy[5]
    stopped = list(generate_tokens(model, prompt, 40, temperature=0.0, top_k=None, top_p=1.0, eos_id=stop))
    assert stopped == greedy[: greedy.index(stop)]


def test_cli_streams_text_to_stdout_and_stats_to_stderr(trained, capsys):
    samples = generate(trained, prompt="The robot", num_samples=2, max_new_tokens=12, temperature=0.9, top_k=20)
    out, err = capsys.readouterr()
    assert len(samples) == 2 and all(1 <= len(ids) <= 12 for ids in samples)
    assert out.count("The robot") == 2
    assert "tokens/s" in err and "tokens/s" not in out


def test_stream_text_waits_for_complete_characters(trained):
    _, tokenizer = load_model(trained / "final", torch.device("cpu"), torch.float32)
    ids = tokenizer.encode("café ☕ done").tolist()
    out = io.StringIO()
    stream_text(tokenizer, iter(ids), out)
    assert out.getvalue() == "café ☕ done"


def test_newest_checkpoint_of_an_output_dir(trained):
    assert resolve_checkpoint_dir(trained) == trained / "final"


def test_a_bias_balanced_checkpoint_samples_and_scores_routing_as_trained(train_args, tmp_path, capsys):
    """Aux-loss-free balancing on the softmax router saves `mlp.expert_bias`; the tools load it and route with it."""
    from litmoe.core.checkpoint_io import load_state
    from litmoe.inference.evaluate import evaluate
    from litmoe.training.cli import main

    out_dir = tmp_path / "biased"
    main(train_args(out_dir, 256 * 8, extra=("--moe.bias_update_rate", "0.01")))
    saved = load_state(out_dir / "final" / "lit_model.pth")["model"]["transformer.h.0.mlp.expert_bias"]
    assert saved.abs().sum() > 0

    model, tokenizer = load_model(out_dir / "final", torch.device("cpu"), torch.float32)
    assert torch.equal(model.transformer.h[0].mlp.expert_bias, saved)
    ids = tokenizer.encode("The cat sees a red ball today.", bos=True)[None]
    with torch.no_grad():
        routed = model(ids)
        for layer in model.transformer.h:
            layer.mlp.expert_bias.zero_()
        unbiased = model(ids)
    assert not torch.allclose(routed, unbiased)  # the bias changes which experts are chosen

    capsys.readouterr()
    (sample,) = generate(out_dir / "final", prompt="The cat", max_new_tokens=5, temperature=0.0)
    assert capsys.readouterr().out.startswith("The cat") and len(sample) == 5
    (result,) = evaluate([out_dir / "final"], max_batches=2)
    assert result["tokens"] > 0


@pytest.mark.parametrize("devices", [1, 2])
def test_a_reader_that_goes_away_ends_generation_quietly(trained, devices):
    """`generate.py ... | head -c 20`: a closed pipe stops the command as it stops Unix tools, with no traceback;
    split across two ranks, the other rank ends without a word too (rank 0 left because its reader did)."""
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, str(REPO / "generate.py"), "--checkpoint", str(trained / "final"), "--prompt", "The",
               "--max_new_tokens", "50", "--num_samples", "200", "--temperature", "1.0",
               "--devices", str(devices)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.read(20)
    process.stdout.close()
    stderr = process.stderr.read().decode()  # until every rank has closed it
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "error:" not in stderr, stderr[-2000:]


def test_a_sample_of_only_blanks_says_why(trained, capsys, monkeypatch):
    import litmoe.inference.generate

    _, tokenizer = load_model(trained / "final", torch.device("cpu"), torch.float32)
    blanks = tokenizer.encode("\n\n\n").tolist()
    monkeypatch.setattr(litmoe.inference.generate, "generate_tokens", lambda *args: iter(blanks))
    generate(trained, prompt="The cat", max_new_tokens=5, temperature=0.0)
    err = capsys.readouterr().err
    assert "sample 1: only whitespace: after this prompt the model's most likely tokens are blanks" in err


@pytest.mark.parametrize(
    ("piped", "expected"),
    [
        (b"\xef\xbb\xbfThe cat", "The cat"),  # a byte-order mark (PowerShell pipes one) is not part of the prompt
        (b"\xff\xfe\x00", "the prompt on stdin is not UTF-8 text (byte 0); pipe UTF-8 text"),
        (b"", "the prompt on stdin is empty; pipe some text, or pass --prompt ''"),
    ],
)
def test_a_prompt_on_stdin_is_read_as_utf8(piped, expected, monkeypatch):
    from litmoe.core.errors import UserError
    from litmoe.inference.generate import read_prompt

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped)))
    if expected == "The cat":
        assert read_prompt(None, None) == expected
    else:
        with pytest.raises(UserError, match=re.escape(expected)):
            read_prompt("-", None)


def test_each_rank_share_of_attention_and_moe_sums_to_the_whole_layer():
    """Tensor parallelism (generate.py --devices N): each rank's share of an attention layer (whole query groups),
    of litmoe's MoE layer (every expert's hidden units, the shared experts') and of a dense MLP computes a partial
    output, biases added once, and the partial outputs of the ranks add up to the whole layer's."""
    import copy
    from functools import partial
    from types import SimpleNamespace

    import litgpt.generate.tp as tp
    from litgpt import GPT, Config
    from litgpt.model import CausalSelfAttention, LLaMAMLP

    from litmoe.inference.tensor_parallel import split_attention, split_mlp, split_model
    from litmoe.model.moe import MoELayer

    config = Config(n_embd=64, n_head=8, n_query_groups=4, block_size=16, bias=True, mlp_class_name="LLaMAMoE",
                    moe_intermediate_size=32, n_expert=4, n_expert_per_token=2, n_shared_expert=1,
                    intermediate_size=96, first_k_dense_replace=1)  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(2, 5, config.n_embd)
    attention, moe, dense = CausalSelfAttention(config, block_idx=0), MoELayer(config), LLaMAMLP(config)
    for module in (attention, moe, dense):
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.1)  # biases too: each must be added once
    rope = tuple(torch.randn(1, 5, config.rope_n_elem) for _ in range(2))
    world_size = 4
    layers = [  # (layer, its split, its forward)
        (attention, split_attention, lambda layer: layer(x, *rope)),
        (moe, partial(split_mlp, tp.tensor_parallel_mlp), lambda layer: layer(x)),
        (dense, partial(split_mlp, tp.tensor_parallel_mlp), lambda layer: layer(x)),  # a first_k_dense_replace block
    ]
    for whole, split, forward in layers:
        shares = []
        for rank in range(world_size):
            share = copy.deepcopy(whole)
            share.config = copy.copy(config)
            split(SimpleNamespace(global_rank=rank, world_size=world_size), share)
            assert len(share._forward_hooks) == 1  # the sum across ranks
            share._forward_hooks.clear()
            for name in ("n_head", "n_query_groups", "n_embd"):  # as LitGPT's tensor_parallel sets them
                setattr(share.config, name, getattr(config, name) // world_size)
            shares.append(forward(share))
        torch.testing.assert_close(sum(shares), forward(whole), rtol=1e-5, atol=1e-6)

    model = GPT(Config(n_embd=64, n_head=8, n_query_groups=4, n_layer=1, block_size=16, scale_embeddings=True))
    split_model(SimpleNamespace(global_rank=1, world_size=2, device=torch.device("cpu")), model)
    assert (model.config.n_head, model.config.n_embd) == (4, 64)  # the embeddings' scale reads the whole width


def test_two_devices_sample_what_one_samples(trained, capsys):
    """`generate.py --devices 2` (two CPU ranks over gloo) splits the model and writes, from rank 0 only, the
    samples one process writes with the same seed."""
    import subprocess

    from conftest import REPO

    prompt = ["--prompt", "The robot", "--num_samples", "2", "--max_new_tokens", "16", "--temperature", "1.0",
              "--top_k", "null"]  # fmt: skip
    generate(trained, prompt="The robot", num_samples=2, max_new_tokens=16, temperature=1.0, top_k=None)
    expected = capsys.readouterr().out
    split = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(trained), *prompt, "--devices", "2"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == expected and expected.count("The robot") == 2
    assert "x 2, tensor parallel" in split.stderr and "FutureWarning" not in split.stderr
