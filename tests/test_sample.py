"""Generation: the KV-cache path against full recomputation, and sample.py end to end."""
import io
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from harness import checkpoint as checkpoint_lib
from model import GPT, GPTConfig, MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_MODES = range(len(MODES))  # every mode, a new one included


def tiny_model(mode, vocab_size=64, block_size=16, dtype=torch.float64, seed=0, n_layer=3):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=block_size, vocab_size=vocab_size,
                    residual_mode=mode)
    model = GPT(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init: sharper, more varied predictions
            p.mul_(8.0) if p.dim() == 2 else p.normal_()
    return model


@pytest.mark.parametrize("mode", ALL_MODES)
def test_cached_logits_equal_full_forward(mode):
    model = tiny_model(mode)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = [[] for _ in range(3)]
    with torch.no_grad():
        logits, _ = model(idx[:, :5], kv_cache=cache)  # prefill 5 positions
        steps = [logits[:, -1]]
        for t in range(5, 12):  # then one position at a time
            logits, _ = model(idx[:, t:t + 1], kv_cache=cache)
            steps.append(logits[:, -1])
        full, _ = model(idx)
    assert cache[0][0].shape == (2, 2, 12, 8)  # (B, nh, T, hs): every position cached
    for i, t in enumerate(range(4, 12)):
        assert (steps[i] - full[:, t]).abs().max().item() < 1e-10


def reference_greedy(model, idx, n_new):
    """No cache: recompute the window every token, sliding as generate_stream documents (when the window
    exceeds block_size, keep its newest block_size // 2 tokens)."""
    bs = model.config.block_size
    start = max(0, idx.size(1) - bs)
    for _ in range(n_new):
        if idx.size(1) - start > bs:
            start = idx.size(1) - bs // 2
        logits, _ = model(idx[:, start:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("mode", ALL_MODES)
def test_greedy_with_cache_equals_without_past_block_size(mode):
    model = tiny_model(mode)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached = model.generate(prompt, 40, temperature=0, use_cache=True)  # 45 tokens > block_size 16
        uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
        reference = reference_greedy(model, prompt, 40)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sampled_with_cache_equals_without_past_block_size(mode):
    """Sampling draws one number per token on either path, so equal logits give equal tokens; unlike
    greedy decoding of a random model, the sequence does not settle on one token."""
    model = tiny_model(mode)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    runs = [model.generate(prompt, 40, temperature=1.0, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(7)) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    assert len(set(runs[0][0, 5:].tolist())) > 10


def test_prompt_longer_than_block_size():
    model = tiny_model(3)
    prompt = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(prompt, 10, temperature=0)
        assert torch.equal(out, reference_greedy(model, prompt, 10))


def test_sampling_is_seeded():
    model = tiny_model(1)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(5))
    c = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_restrict_the_choice():
    from model import sample_next
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    # p(1) ~ 0.45, p(2) ~ 0.41: top_p 0.5 needs both, top_p 0.3 only the first
    draws = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_next(logits, 1.0, top_p=0.3, generator=g).item() for _ in range(50)}
    assert draws == {1}


# ---------------------------------------------------------------- sample.py end to end

def write_checkpoint(path, tokenizer, mode=3, n_layer=3, **overrides):
    vocab = {"byte": 257, "gpt2": 50257}[tokenizer]
    model = tiny_model(mode, vocab_size=vocab + (-vocab % 64), block_size=32, dtype=torch.float32,
                       n_layer=n_layer)
    ckpt = {"model_args": asdict(model.config), "model": model.state_dict(),
            "tokenizer": {"name": tokenizer, "vocab_size": vocab, "eot_token": vocab - 1}, **overrides}
    if "format_version" in overrides:  # another version: written as it is
        torch.save(ckpt, path)
    else:  # with the format version and checksum, as train.py writes it
        checkpoint_lib.save(str(path), ckpt)
    return path


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_sample_script_round_trips_start_and_is_seeded(tmp_path, tokenizer):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", tokenizer)
    start = "héllo → 世界\n"
    args = [f"--ckpt={ckpt}", f"--start={start}", "--num_samples=2", "--max_new_tokens=40", "--seed=3"]
    a, b = run_sample(*args), run_sample(*args)
    c = run_sample(*args[:-1], "--seed=4")
    assert a.returncode == 0, a.stderr.decode()
    text = a.stdout.decode("utf-8")
    samples = text.split("\n---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    assert all(s.startswith(start) and len(s) > len(start) for s in samples[:2])
    assert a.stdout == b.stdout and a.stdout != c.stdout


def test_sample_script_reads_out_dir_and_file_prompt(tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt", "byte")
    (tmp_path / "prompt.txt").write_text("def main():\n", encoding="utf-8")
    r = run_sample(f"--out_dir={tmp_path}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=1",
                   "--max_new_tokens=5", "--temperature=0")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().startswith("def main():\n")


def test_sample_script_reads_a_config_file_then_flags(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", "byte")
    (tmp_path / "greedy.py").write_text("temperature = 0\nnum_samples = 1\nmax_new_tokens = 5\n")
    r = run_sample(str(tmp_path / "greedy.py"), f"--ckpt={ckpt}", "--num_samples=2", "--start=ab")
    assert r.returncode == 0, r.stderr.decode()
    samples = r.stdout.decode().split("\n---------------\n")
    assert len(samples) == 3 and samples[0] == samples[1]  # 2 from the flag, greedy from the file
    assert samples[0].startswith("ab") and len(samples[0]) > 2


def test_sample_script_finds_the_newest_run(tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt", "byte")
    (tmp_path / "method3_cpu").mkdir()
    write_checkpoint(tmp_path / "method3_cpu" / "ckpt.pt", "byte")
    args = ["--num_samples=1", "--max_new_tokens=5", "--start=x"]
    direct = run_sample(f"--out_dir={tmp_path}", *args)
    assert direct.returncode == 0 and direct.stderr == b""  # out_dir/ckpt.pt itself wins
    os.remove(tmp_path / "ckpt.pt")
    found = run_sample(f"--out_dir={tmp_path}", *args)
    assert found.returncode == 0, found.stderr.decode()
    assert "method3_cpu" in found.stderr.decode()


def one_line_error(result, *needles):
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_missing_checkpoint_points_to_train(tmp_path):
    one_line_error(run_sample(f"--out_dir={tmp_path}"), "no checkpoint", "train.py")


def test_unknown_format_version(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", "byte", format_version=99)
    one_line_error(run_sample(f"--ckpt={ckpt}"), "format version 99")


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    one_line_error(run_sample(f"--out_dir={tmp_path}"), "cannot read checkpoint", "corrupt")


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_unrepresentable_start_text(tmp_path, tokenizer):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", tokenizer)
    # invalid UTF-8 on the command line reaches Python as a lone surrogate, which no tokenizer can encode
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--ckpt={ckpt}".encode(),
                        b"--start=abc\xff"], capture_output=True, cwd=ROOT, timeout=120)
    one_line_error(r, "cannot represent the start text")


def test_unknown_option_suggests(tmp_path):
    one_line_error(run_sample("--temprature=0.5"),
                   "unknown", "temprature", "did you mean", "temperature")
    one_line_error(run_sample("--top_k=abc"), "--top_k=abc")


def test_compile_flag_compiles_the_forward_that_generation_runs(tmp_path, monkeypatch):
    """--compile=true must route generate_stream's self(...) calls through compiled code, and give
    the same text. torch.compile gets a counting eager backend: no C compiler, seconds."""
    from harness import configurator
    import sample
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", "byte", n_layer=1)
    config = {**configurator.defaults(sample.__file__), "ckpt": str(ckpt), "num_samples": 1,
              "max_new_tokens": 20, "start": "x", "device": "cpu", "dtype": "float32"}
    counts = {"graphs": 0, "calls": 0}

    def counting_backend(gm, example_inputs):
        counts["graphs"] += 1

        def run(*args):
            counts["calls"] += 1
            return gm.forward(*args)
        return run

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: real_compile(fn, **{**kw, "backend": counting_backend}))

    def run(compile):
        stdout = io.TextIOWrapper(io.BytesIO())
        monkeypatch.setattr(sys, "stdout", stdout)
        sample.main({**config, "compile": compile})
        return stdout.buffer.getvalue()

    torch._dynamo.reset()
    try:
        eager = run(False)
        assert counts["calls"] == 0
        compiled = run(True)
    finally:
        torch._dynamo.reset()
    # a forward per token, each one whole compiled graph
    assert counts["calls"] == 20, counts
    assert counts["graphs"] <= 6, counts  # dynamic shapes: no recompiling for each cached length
    assert compiled == eager and compiled.startswith(b"x")
