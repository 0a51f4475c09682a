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
    # VmHWM, not getrusage: Linux carries ru_maxrss across fork + exec, so a child would report at least
    # the parent's size at the fork; VmHWM belongs to this process image alone
    print(model_vmhwm_bytes())


def model_vmhwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


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
        print(f"| {name} | {label} | {r['tok_s']:.0f} | {speed:.3f} | {r['act']:.0f} | {act:.3f} | "
              f"{r['peak'] / 2**20:.0f} | {peak:.3f} | {verdict} |")
    print(f"model targets: {'all PASS' if ok else 'some FAIL'}")


# -----------------------------------------------------------------------------
# prepare: tokenizing throughput against a bare tiktoken loop, parallel speed-up, memory bound


def prepare_stdlib_texts():
    """The default corpus as decoded texts, exactly what prepare.py tokenizes (sorted stdlib .py files)."""
    import prepare
    entries, _, total = prepare.resolve_sources(["pystdlib"])
    return [open(path, "rb").read().decode("utf-8", "replace") for _, path in entries], total


def prepare_timed_run(workers, data_dir):
    import prepare
    t0 = time.perf_counter()
    prepare.prepare(["pystdlib"], name=f"w{workers}", data_dir=data_dir, workers=workers, overwrite=True, quiet=True)
    return time.perf_counter() - t0


def prepare_write_corpus(folder, n_bytes, texts):
    """A folder of ~1 MB text files, n_bytes in all, cut from the stdlib texts (repeated as needed)."""
    os.makedirs(folder)
    blob = "\n".join(texts).encode("utf-8")
    written, i = 0, 0
    while written < n_bytes:
        part = blob[(written % len(blob)):][:min(1 << 20, n_bytes - written)]
        with open(os.path.join(folder, f"part{i:05d}.txt"), "wb") as f:
            f.write(part)
        written, i = written + len(part), i + 1


def prepare_peak_rss(args):
    """Peak RSS (bytes) of prepare.main(ARGS) in a fresh process, as its own VmHWM at exit (ru_maxrss would
    also count the memory of this process, which the child had between fork and exec)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import prepare; "
            "prepare.main(sys.argv[1:]); print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code, *args, "--quiet"], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"prepare.py {' '.join(args)} failed: {out.stderr.strip()}")
    return int(out.stdout.split()[-2]) * 1024  # "VmHWM:   51234 kB"


def bench_prepare(rounds=5, rss_shard_tokens=10_000_000):
    import tempfile
    import prepare
    if not os.path.exists("/proc/self/status"):
        print("prepare: skipped, peak RSS is read from /proc (Linux only)")
        return
    try:
        enc = prepare.get_tokenizer("gpt2")
    except prepare.DataError as e:
        print(f"prepare: skipped, {e}")
        return
    texts, n_bytes = prepare_stdlib_texts()
    mb = n_bytes / 1e6
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        # 1. throughput on the same text: interleaved rounds, medians
        times = {"bare": [], 1: [], 2: []}
        for _ in range(rounds):
            t0 = time.perf_counter()
            for text in texts:
                enc.encode(text)  # tiktoken's encode_ordinary, single-threaded, nothing else
            times["bare"].append(time.perf_counter() - t0)
            for workers in (1, 2):
                times[workers].append(prepare_timed_run(workers, tmp))
        rate = {k: mb / statistics.median(v) for k, v in times.items()}
        ratio_w1, ratio_w2 = rate[1] / rate["bare"], rate[2] / rate[1]
        rows.append(("bare tiktoken encode_ordinary loop", f"{rate['bare']:.1f} MB/s", "", "", ""))
        for label, value, ratio, target in (("prepare --workers 1", rate[1], ratio_w1, 0.8),
                                            ("prepare --workers 2", rate[2], ratio_w2, 1.7)):
            passed = ratio >= target
            ok &= passed
            base = "bare" if label.endswith("1") else "workers 1"
            rows.append((label, f"{value:.1f} MB/s", f"{ratio:.2f}x {base}", f">= {target}x",
                         "PASS" if passed else "FAIL"))
        # 2. peak RSS: a corpus of ten shards against a corpus of one (byte tokens = bytes, so sizes are exact)
        rss = {}
        for label, size in (("1 shard", int(0.95 * rss_shard_tokens)), ("10 shards", 10 * rss_shard_tokens)):
            folder = os.path.join(tmp, label.replace(" ", "_"))
            prepare_write_corpus(folder, size, texts)
            rss[label] = prepare_peak_rss([folder, "--name", "rss", "--tokenizer", "byte", "--data-dir", tmp,
                                           "--shard-tokens", str(rss_shard_tokens), "--workers", "1", "--overwrite"])
            rows.append((f"peak RSS, {label} ({size / 1e6:.0f} MB)", f"{rss[label] / 2**20:.0f} MiB", "", "", ""))
        ratio = rss["10 shards"] / rss["1 shard"]
        ok &= ratio <= 2
        rows[-1] = rows[-1][:2] + (f"{ratio:.2f}x 1 shard", "<= 2x", "PASS" if ratio <= 2 else "FAIL")
        # 3. the default corpus from the command line, both tokenizers, all cores
        for flags in ([], ["--tokenizer", "byte"]):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare.py"),
                            *flags, "--data-dir", tmp, "--quiet"], check=True)
            seconds = time.perf_counter() - t0
            name = "pystdlib" + ("_byte" if flags else "")
            meta = prepare.read_meta(os.path.join(tmp, name))
            tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
            ok &= seconds < 120
            rows.append((f"python prepare.py {' '.join(flags)}".strip(), f"{seconds:.1f} s", f"{tokens:,} tokens",
                         "< 120 s", "PASS" if seconds < 120 else "FAIL"))
    print(f"prepare on the Python {prepare.platform.python_version()} stdlib ({mb:.1f} MB, {len(texts)} files, gpt2), "
          f"median of {rounds} interleaved rounds; peak RSS with --tokenizer byte --shard-tokens {rss_shard_tokens:,}")
    print("| measure | value | ratio | target | result |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"prepare targets: {'all PASS' if ok else 'some FAIL'}")


TRAIN_CONFIGS = ["configs/method3.py", "configs/cpu.py"]  # the model and batch of the CPU run


def train_loop_tokens_per_sec(dtype, iters, out_dir, log_interval=10):
    """train.py itself, as a subprocess: the tokens/s it logs (eval and checkpoint time excluded),
    median over its log windows after the first (warm-up)."""
    import json
    cmd = [sys.executable, "train.py", *TRAIN_CONFIGS, f"--dtype={dtype}", f"--max_iters={iters}",
           f"--log_interval={log_interval}", f"--eval_interval={iters}", "--eval_iters=1", f"--ckpt_interval={iters}",
           f"--out_dir={out_dir}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return statistics.median(r["tokens_per_sec"] for r in records if r["type"] == "train" and r["iter"] > log_interval)


def train_bare_step(cfg, dtype):
    """The same model and batch, trained by the least code possible: forward, backward, clip, AdamW step.
    Returns step() and the model."""
    import contextlib
    torch.manual_seed(0)
    args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "mlp_hidden", "block_size", "residual_mode")}
    model = GPT(GPTConfig(**args, vocab_size=320))  # the byte vocabulary, 257, padded to 320 as train.py does
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 257, (2, cfg["batch_size"], cfg["block_size"]), generator=g)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    def step():
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, model


def train_bare_tokens_per_sec(dtype, iters, log_interval):
    """The bare step, in a fresh process like train.py's loop, so that neither side has the other's
    warm caches or memory: median tokens/s over log_interval-step windows after the first."""
    code = f"import bench; print(bench.train_bare_run({dtype!r}, {iters}, {log_interval}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def train_bare_run(dtype, iters, log_interval):
    import train
    cfg = train.load_config(TRAIN_CONFIGS)
    step, _ = train_bare_step(cfg, dtype)
    tokens = cfg["batch_size"] * cfg["block_size"]
    windows = []
    for _ in range(iters // log_interval):
        t0 = time.perf_counter()
        for _ in range(log_interval):
            step()
        windows.append(log_interval * tokens / (time.perf_counter() - t0))
    return statistics.median(windows[1:])


def bench_train(rounds=3, iters=40, log_interval=10):
    """train.py's whole loop (data, logging, eval and checkpoint bookkeeping) against a bare step of the
    same model, each in a fresh process, fp32 and bf16 autocast, interleaved rounds; and MFU against
    this CPU's measured matmul peak."""
    import shutil
    import tempfile
    import model as model_lib
    import train
    cfg = train.load_config(TRAIN_CONFIGS)
    print(f"configs/method3.py + configs/cpu.py on CPU ({torch.get_num_threads()} threads): n_layer {cfg['n_layer']}, "
          f"n_embd {cfg['n_embd']}, block_size {cfg['block_size']}, batch {cfg['batch_size']}; {rounds} interleaved "
          f"rounds of {iters} iterations, median tokens/s over {log_interval}-iteration windows after the first")
    dtypes = ["float32", "bfloat16"]
    results = {(d, kind): [] for d in dtypes for kind in ("loop", "bare")}
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    try:
        for r in range(rounds):
            for d in dtypes:
                out = os.path.join(tmp, f"{d}_{r}")
                results[d, "loop"].append(train_loop_tokens_per_sec(d, iters, out, log_interval))
                results[d, "bare"].append(train_bare_tokens_per_sec(d, iters, log_interval))
                print(f"  round {r + 1} {d}: loop {results[d, 'loop'][-1]:,.0f} tok/s, "
                      f"bare {results[d, 'bare'][-1]:,.0f} tok/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _, model = train_bare_step(cfg, "float32")  # for its FLOPs per token
    ok = True
    print("\n| dtype | loop tokens/s | bare tokens/s | loop / bare | target | result | matmul peak GFLOP/s | "
          "loop MFU | bare MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in dtypes:
        loop_tps, bare_tps = (statistics.median(results[d, k]) for k in ("loop", "bare"))
        ratio = loop_tps / bare_tps
        passed = ratio >= 0.95
        ok &= passed
        peak = model_lib.measure_cpu_matmul_flops(train.DTYPES[d])
        print(f"| {d} | {loop_tps:,.0f} | {bare_tps:,.0f} | {ratio:.3f} | >= 0.95 | {'PASS' if passed else 'FAIL'} | "
              f"{peak / 1e9:.1f} | {model.estimate_mfu(loop_tps, peak):.1%} | {model.estimate_mfu(bare_tps, peak):.1%} |")
    print(f"train targets: {'all PASS' if ok else 'some FAIL'}")


def sample_cpu_model():
    """The model of `python train.py configs/method3.py configs/cpu.py`, randomly initialised: speed
    does not depend on the weights."""
    cfg = {}
    for path in ("configs/method3.py", "configs/cpu.py"):
        with open(path) as f:
            exec(f.read(), {}, cfg)
    args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "mlp_hidden", "block_size", "residual_mode")}
    vocab = 257 if cfg["dataset"].endswith("_byte") else 50257
    torch.manual_seed(0)
    return GPT(GPTConfig(**args, vocab_size=vocab + (-vocab % 64))).eval(), vocab


def bench_sample(new_tokens=256, rounds=5):
    """Generation with and without the KV cache, and a floor for the cached step. At batch 1 a cached
    step is one matrix-vector product per weight matrix, so it reads every weight once per token (8.5 MB
    in fp32 here) for little arithmetic. Without the cache each token recomputes the window (~80
    positions on average here) with matrix-matrix products that reuse each weight that many times."""
    model, vocab = sample_cpu_model()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    linears = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    one_position = {n: torch.randn(1, 1, n) for n in {lin.in_features for lin in linears}}
    weight_bytes = sum(lin.weight.nbytes for lin in linears)

    def generate(use_cache):
        model.generate(prompt, new_tokens, temperature=1.0, top_k=200, use_cache=use_cache,
                       generator=torch.Generator().manual_seed(0), vocab_size=vocab)

    def weight_reads():  # every weight matrix applied to one position, in model order, once per token
        for _ in range(new_tokens):
            for lin in linears:
                lin(one_position[lin.in_features])

    runs = {"KV cache": lambda: generate(True), "no cache": lambda: generate(False),
            "weight reads only": weight_reads}
    print(f"configs/method3.py + configs/cpu.py model ({model.config}), batch 1, {new_tokens} new tokens, "
          f"{rounds} interleaved rounds, median")
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    tps = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    print("| generation | tokens/s | x no cache |\n|---|---|---|")
    for name in runs:
        print(f"| {name} | {tps[name]:.0f} | {tps[name] / tps['no cache']:.2f} |")
    print(f"weights read per cached token: {weight_bytes / 1e6:.1f} MB "
          f"({weight_bytes * tps['weight reads only'] / 1e9:.1f} GB/s in the weight-reads-only run); "
          f"the cached step takes {tps['weight reads only'] / tps['KV cache']:.2f}x as long as those reads")
    speedup = tps["KV cache"] / tps["no cache"]
    print(f"sample target (cache >= 5x): {'PASS' if speedup >= 5 else 'FAIL'}")


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
