"""
Benchmarks. Every target is a ratio measured side by side in one process (interleaved, medians),
because these machines are shared and noisy: absolute times across runs mean little.

    python bench.py                  # every section
    python bench.py model prepare    # some sections: model, prepare, train, sample
"""
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from model import GPT, GPTConfig


# -----------------------------------------------------------------------------
# model: forward + backward + optimizer step of every residual mode, and a naive reference

MODEL_BENCH = dict(n_layer=12, n_head=6, n_embd=384, block_size=256, vocab_size=320)  # byte-level vocab:
MODEL_BATCH = 4  # a GPT-2 vocab would make lm_head dominate and hide what the residual mixing costs


class NaiveGPT(GPT):
    """Modes 1-3 the obvious way, for contrast: a list of past states, torch.stack, mean or weighted sum."""

    def forward_blocks(self, x, kv_cache=None):
        mode = self.config.residual_mode
        attn_inputs, mlp_inputs = [], []
        for m, block in enumerate(self.transformer.h):
            attn_inputs.append(x)
            base = torch.stack(attn_inputs).mean(0) if mode == 2 else x
            x = base + block.attn(block.ln_1(x))
            mlp_inputs.append(x)
            mlp_out = block.mlp(block.ln_2(x))
            if mode == 1:
                x = torch.stack(mlp_inputs).mean(0) + mlp_out
            elif mode == 3 and m > 0:
                w = torch.softmax(block.layer_logits, dim=0).view(-1, 1, 1, 1)  # (m+1, 1, 1, 1)
                x = (w * torch.stack(mlp_inputs)).sum(0) + mlp_out  # (m+1, B, T, C) -> (B, T, C)
            else:
                x = x + mlp_out
        return x


MODEL_VARIANTS = [("mode 0", GPT, 0), ("mode 1", GPT, 1), ("mode 2", GPT, 2), ("mode 3", GPT, 3),
                  ("naive 1", NaiveGPT, 1), ("naive 2", NaiveGPT, 2), ("naive 3", NaiveGPT, 3)]


def model_make(cls, mode, device):
    torch.manual_seed(0)
    model = cls(GPTConfig(**MODEL_BENCH, residual_mode=mode)).to(device)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    return model, optimizer


def model_batch(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, MODEL_BENCH["vocab_size"], (MODEL_BATCH, MODEL_BENCH["block_size"] + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def model_step(model, optimizer, x, y):
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_bytes_per_token(model, x, y):
    """Bytes that autograd saves for backward in one forward, per token: every tensor the pack hook
    sees, each storage counted once, parameters excluded (they are not activations)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    del loss
    return sum(storages.values()) / x.numel()


def model_peak_memory(name, compiled, device):
    """Peak memory of a few training steps of one variant: max RSS of a fresh subprocess on CPU (so
    that variants do not share a high-water mark), peak allocated memory on CUDA."""
    if device.type == "cuda":
        cls, mode = {n: (c, m) for n, c, m in MODEL_VARIANTS}[name]
        model, optimizer = model_make(cls, mode, device)
        model = torch.compile(model) if compiled else model
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            model_step(model, optimizer, *model_batch(device))
        return torch.cuda.max_memory_allocated()
    out = subprocess.run([sys.executable, __file__, "--peak-rss", name, str(int(compiled))],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def model_peak_rss_child(name, compiled):
    cls, mode = {n: (c, m) for n, c, m in MODEL_VARIANTS}[name]
    model, optimizer = model_make(cls, mode, torch.device("cpu"))
    model = torch.compile(model) if compiled == "1" else model
    for _ in range(2):
        model_step(model, optimizer, *model_batch(torch.device("cpu")))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def bench_model(rounds=7):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = model_batch(device)
    tokens = x.numel()
    print(f"device {device}, threads {torch.get_num_threads()}, config {MODEL_BENCH}, batch {MODEL_BATCH}, "
          f"{rounds} interleaved rounds, median step time")
    results = {}
    for compiled in (False, True):
        label = "compiled" if compiled else "eager"
        runs = {}
        for name, cls, mode in MODEL_VARIANTS:
            model, optimizer = model_make(cls, mode, device)
            runs[name] = (torch.compile(model) if compiled else model, optimizer)
            t0 = time.perf_counter()
            for _ in range(2):  # warm up (and compile)
                model_step(*runs[name], x, y)
            print(f"  {label} {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        times = {name: [] for name in runs}
        for _ in range(rounds):  # interleaved, so that a noisy neighbour hits every variant alike
            for name, (model, optimizer) in runs.items():
                synchronize(device)
                t0 = time.perf_counter()
                model_step(model, optimizer, x, y)
                synchronize(device)
                times[name].append(time.perf_counter() - t0)
        for name, (model, _) in runs.items():
            results[label, name] = dict(tok_s=tokens / statistics.median(times[name]),
                                        act=saved_bytes_per_token(model, x, y),
                                        peak=model_peak_memory(name, compiled, device))
        del runs
    targets = {"mode 1": (0.97, 1.02), "mode 2": (0.97, 1.02), "mode 3": (0.95, 1.05)}
    peak_label = "peak alloc" if device.type == "cuda" else "peak RSS"
    print(f"\n| variant | build | tokens/s | x mode 0 | saved bytes/token | x mode 0 | {peak_label} MB | x mode 0 | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for (label, name), r in results.items():
        base = results[label, "mode 0"]
        speed, act, peak = r["tok_s"] / base["tok_s"], r["act"] / base["act"], r["peak"] / base["peak"]
        verdict = ""
        if label == "compiled" and name in targets:
            min_speed, max_act = targets[name]
            passed = speed >= min_speed and act <= max_act
            ok &= passed
            verdict = f"{'PASS' if passed else 'FAIL'} (>= {min_speed}x speed, <= {max_act}x bytes)"
        print(f"| {name} | {label} | {r['tok_s']:.0f} | {speed:.3f} | {act:.0f} | {act:.3f} | "
              f"{r['peak'] / 2**20:.0f} | {peak:.3f} | {verdict} |")
    print(f"model targets: {'all PASS' if ok else 'some FAIL'}")


def bench_prepare():
    raise NotImplementedError  # prepare section (issue 3)


def bench_train():
    raise NotImplementedError  # train section (issue 4)


def bench_sample():
    raise NotImplementedError  # sample section (issue 5)


SECTIONS = {"model": bench_model, "prepare": bench_prepare, "train": bench_train, "sample": bench_sample}

if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak-rss"]:  # child process of model_peak_memory
        model_peak_rss_child(*sys.argv[2:4])
        sys.exit()
    names = sys.argv[1:] or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"bench.py: unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        SECTIONS[name]()
