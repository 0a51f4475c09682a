"""
Benchmarks. Every target is a ratio measured side by side in one process (interleaved, medians),
because these machines are shared and noisy: absolute times across runs mean little.

    python bench.py                  # every section
    python bench.py model prepare    # some sections: model, prepare, train, sample, gpu
"""
import collections
import functools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from harness import configurator, report
from harness.hardware import measure_cpu_matmul_flops, peak_flops
from model import GPT, GPTConfig, MODES

HERE = os.path.dirname(os.path.abspath(__file__))


def interleaved(runs, rounds, sync=lambda: None, timed=True, progress=False):
    """Median per run over rounds that take every run in turn, so that a noisy neighbour slows them
    alike: of its wall time, or (timed=False) of the number it returns."""
    values = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            value = run()
            sync()
            values[name].append(time.perf_counter() - t0 if timed else value)
        if progress:
            print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.6g}" for n, v in values.items()),
                  flush=True)
    return {name: statistics.median(v) for name, v in values.items()}


def python(*args, env=None):
    """What python prints, run with args here in a fresh process (own caches and memory peak)."""
    out = subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"python {args} failed:\n{out.stderr.strip()}")
    return out.stdout


def run_python(code, peak=None):
    """The last number that code prints in a fresh python, or with peak (a device type) that
    process's peak memory in bytes."""
    if peak:
        code += f"\nfrom harness import report\nprint(report.peak_memory_bytes({peak!r}))"
    return float(python("-c", code).split()[-1])


def table(section, header, rows):
    """A markdown table: a bool cell is a target's PASS or FAIL, short rows end in empty cells; then
    whether all of the section's targets passed."""
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        row = [{True: "PASS", False: "FAIL"}[c] if isinstance(c, bool) else c for c in row]
        print("| " + " | ".join(row + [""] * (len(header) - len(row))) + " |")
    passes = [c for row in rows for c in row if isinstance(c, bool)]
    print(f"{section} targets: {'all PASS' if all(passes) else 'some FAIL'}")


# -----------------------------------------------------------------------------
# model: forward + backward + optimizer step of every residual mode, and a naive reference

# a byte-level vocab: GPT-2's would make lm_head dominate and hide what the residual mixing costs
MODEL_BENCH = dict(n_layer=12, n_head=6, n_embd=384, block_size=256, vocab_size=320)
MODEL_BATCH = 4


class NaiveGPT(GPT):
    """Modes 1-3, 5, 6, 8 and 9 the obvious way, for contrast: a list of past states, torch.stack,
    mean or weighted sum; the streams of 8 and 9 a list, stacked into H at every sublayer."""

    def forward_blocks(self, x, kv_cache=None):
        mode = self.config.residual_mode
        if mode == 6:
            return self.naive_attention_residuals(x)
        if mode in (8, 9):
            return self.naive_hyper_connections(x)
        attn_inputs, mlp_inputs, outputs = [], [], [x]
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
            elif mode == 5:
                outputs.append(x + mlp_out)
                x = (block.dwa_weights.view(-1, 1, 1, 1) * torch.stack(outputs)).sum(0)
            else:
                x = x + mlp_out
        return x

    def naive_attention_residuals(self, x):
        blocks, sources = self.transformer.h, [x]
        queries = [q for b in blocks for q in (b.attn_query, b.mlp_query)] + [self.final_query]
        for k, q in enumerate(queries):
            s = torch.stack(sources)  # (k+1, B, T, C)
            w = torch.softmax((s / s.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ q, dim=0)
            z = (w.unsqueeze(-1) * s).sum(0)  # z_k: (B, T, C)
            if k < len(queries) - 1:
                block = blocks[k // 2]
                f = block.mlp(block.ln_2(z)) if k % 2 else block.attn(block.ln_1(z))
                sources.append(f)
        return z

    def naive_hyper_connections(self, x):  # autograd keeps every H, x_k and the maps' insides
        blocks, streams = self.transformer.h, [x] * self.config.hc_streams
        for k in range(2 * len(blocks)):
            block, H = blocks[k // 2], torch.stack(streams, -2)  # (B, T, n, C)
            r, M, w = self.stream_maps(H, k)
            x = (r.unsqueeze(-1) * H).sum(-2)
            y = block.mlp(block.ln_2(x)) if k % 2 else block.attn(block.ln_1(x))
            streams = [(M[..., i, :, None] * H).sum(-2) + w[..., i, None] * y
                       for i in range(len(streams))]
        return torch.stack(streams).mean(0)


# (name, class, residual mode): a variant is one more entry; the first is every ratio's baseline
MODEL_VARIANTS = [(f"mode {m}", GPT, m) for m in range(len(MODES))] + [
    (f"naive {m}", NaiveGPT, m) for m in (1, 2, 3, 5, 6, 8, 9)]
# compiled: (least tokens/s, most saved bytes/token), both as ratios to mode 0
MODEL_TARGETS = {"mode 1": (0.97, 1.02), "mode 2": (0.97, 1.02), "mode 3": (0.95, 1.05),
                 "mode 4": (0.95, 1.02), "mode 5": (0.92, 1.10), "mode 6": (0.80, 1.30),
                 "mode 7": (0.95, 1.02), "mode 8": (0.75, 1.40), "mode 9": (0.70, 1.40)}


def model_batch(device):
    x = torch.randint(0, MODEL_BENCH["vocab_size"], (MODEL_BATCH, MODEL_BENCH["block_size"] + 1),
                      generator=torch.Generator().manual_seed(0))
    return x[:, :-1].to(device), x[:, 1:].to(device)


def train_step(model, optimizer, x, y, dtype=torch.float32, clip=False):
    """Forward (under autocast unless fp32, as train.py runs it), backward, AdamW step."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(x, y)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def model_make(cls, x, y, compiled, dtype=torch.float32, **config):
    """A model and its optimizer, on x's device, after two steps: a warm-up, and the compilation."""
    torch.manual_seed(0)
    model = cls(GPTConfig(**config)).to(x.device)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), x.device.type)
    model = torch.compile(model) if compiled else model
    for _ in range(2):
        train_step(model, optimizer, x, y, dtype)
    return model, optimizer


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
        model(x, y)  # its graph, and what that saved, is freed on return
    return sum(storages.values()) / x.numel()


def strict_compile(limit=8):
    """Dynamo compiles a code object (GPT.forward, shared by every model in the process) at most
    `limit` times, then silently runs it eager: here that is an error instead, so that a row
    labelled "compiled" was compiled."""
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def bench_model(rounds=7):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    strict_compile(64)  # every variant stays compiled at once, for the interleaved rounds
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    x, y = model_batch(device)
    print(f"device {device}, threads {torch.get_num_threads()}, config {MODEL_BENCH}, "
          f"batch {MODEL_BATCH}, {rounds} interleaved rounds, median step time")
    rows = []
    for compiled in (False, True):
        build = "compiled" if compiled else "eager"
        models = {}
        for name, cls, mode in MODEL_VARIANTS:
            t0 = time.perf_counter()
            models[name] = model_make(cls, x, y, compiled, **MODEL_BENCH, residual_mode=mode)
            print(f"  {build} {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        runs = {name: functools.partial(train_step, *models[name], x, y) for name in models}
        seconds = interleaved(runs, rounds, sync)
        results = {}
        for name, cls, mode in MODEL_VARIANTS:  # peak memory of a fresh process: none shared
            code = (f"import bench\nbench.model_make(bench.{cls.__name__}, *bench.model_batch("
                    f"{device!r}), {compiled}, **bench.MODEL_BENCH, residual_mode={mode})")
            act = saved_bytes_per_token(models[name][0], x, y)
            results[name] = (x.numel() / seconds[name], act, run_python(code, peak=device))
            tok_s, act, peak = results[name]
            speed, act_x, peak_x = (v / base for v, base in zip(results[name], results["mode 0"]))
            rows.append([name, build, f"{tok_s:.0f}", f"{speed:.3f}", f"{act:.0f}", f"{act_x:.3f}",
                         f"{peak / 2**20:.0f}", f"{peak_x:.3f}"])
            if compiled and name in MODEL_TARGETS:
                min_speed, max_act = MODEL_TARGETS[name]
                rows[-1] += [f">= {min_speed}x speed, <= {max_act}x bytes",
                             speed >= min_speed and act_x <= max_act]
    peak = "peak alloc" if device == "cuda" else "peak RSS"
    table("model", ["variant", "build", "tokens/s", "x mode 0", "saved bytes/token", "x mode 0",
                    f"{peak} MB", "x mode 0", "target", "result"], rows)


# -----------------------------------------------------------------------------
# prepare: tokenizing throughput against a bare tiktoken loop, parallel speed-up, memory bound

def bench_prepare(rounds=5, rss_shard_tokens=10_000_000):
    import prepare
    from harness import shards, sources
    try:
        enc = prepare.get_tokenizer("gpt2")
    except prepare.DataError as e:
        print(f"prepare: skipped, {e}")
        return
    # the default corpus, exactly what prepare.py tokenizes (sorted stdlib .py files)
    entries, [described], n_bytes = sources.resolve_sources(["pystdlib"])
    texts = [open(path, "rb").read().decode("utf-8", "replace") for _, path in entries]
    mb = n_bytes / 1e6
    print(f"prepare on the Python {described['python']} stdlib ({mb:.1f} MB, {len(texts)} "
          f"files, gpt2), median of {rounds} interleaved rounds; peak RSS with --tokenizer byte "
          f"--shard-tokens {rss_shard_tokens:,}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # 1. throughput on the same text; bare: tiktoken's encode_ordinary, single-threaded, nothing
        # else (the deque consumes the map)
        runs = {"bare": lambda: collections.deque(map(enc.encode, texts), maxlen=0)}
        for w in (1, 2):
            runs[w] = functools.partial(prepare.prepare, ["pystdlib"], name=f"w{w}", data_dir=tmp,
                                        workers=w, overwrite=True, quiet=True)
        rate = {k: mb / s for k, s in interleaved(runs, rounds).items()}
        rows.append(["bare tiktoken encode_ordinary loop", f"{rate['bare']:.1f} MB/s"])
        for w, base, target in ((1, "bare", 0.8), (2, 1, 1.7)):
            ratio = rate[w] / rate[base]
            rows.append([f"prepare --workers {w}", f"{rate[w]:.1f} MB/s",
                         f"{ratio:.2f}x {'bare' if w == 1 else 'workers 1'}", f">= {target}x",
                         ratio >= target])
        # 2. peak RSS: ten shards against one (byte tokens = bytes, so sizes are exact), from
        # folders of 1 MB text files cut from the stdlib texts, repeated as needed
        blob = "\n".join(texts).encode("utf-8")
        rss = {}
        for label, shards_in in (("1 shard", 0.95), ("10 shards", 10)):
            size = int(shards_in * rss_shard_tokens)
            folder = os.path.join(tmp, label.replace(" ", "_"))
            os.makedirs(folder)
            data = (blob * (size // len(blob) + 1))[:size]
            for i in range(0, size, 1 << 20):
                with open(os.path.join(folder, f"part{i >> 20:05d}.txt"), "wb") as f:
                    f.write(data[i:i + (1 << 20)])
            args = [folder, "--name", "rss", "--tokenizer", "byte", "--data-dir", tmp, "--workers",
                    "1", "--shard-tokens", str(rss_shard_tokens), "--overwrite", "--quiet"]
            rss[label] = run_python(f"import prepare\nprepare.main({args!r})", peak="cpu")
            rows.append([f"peak RSS, {label} ({size / 1e6:.0f} MB)",
                         f"{rss[label] / 2**20:.0f} MiB"])
        ratio = rss["10 shards"] / rss["1 shard"]
        rows[-1] += [f"{ratio:.2f}x 1 shard", "<= 2x", ratio <= 2]
        # 3. the default corpus from the command line, both tokenizers, all cores
        for flags in ([], ["--tokenizer", "byte"]):
            t0 = time.perf_counter()
            python("prepare.py", *flags, "--data-dir", tmp, "--quiet")
            seconds = time.perf_counter() - t0
            meta = shards.read_meta(os.path.join(tmp, "pystdlib" + ("_byte" if flags else "")))
            tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
            rows.append([" ".join(["python prepare.py", *flags]), f"{seconds:.1f} s",
                         f"{tokens:,} tokens", "< 120 s", seconds < 120])
    table("prepare", ["measure", "value", "ratio", "target", "result"], rows)


# -----------------------------------------------------------------------------
# train: train.py's loop against a bare step; sample: generation with and without the KV cache

TRAIN_CONFIGS = ["configs/method3.py", "configs/cpu.py"]  # the model and batch of the CPU run


def cpu_run(*flags):
    """The config, model (random weights: speed does not depend on them) and tokenizer vocabulary
    (unpadded) of `python train.py configs/method3.py configs/cpu.py [flags]`."""
    cfg = configurator.load([*TRAIN_CONFIGS, *flags], configurator.defaults("train.py"))
    vocab = 257 if cfg["dataset"].endswith("_byte") else 50257
    args = configurator.model_args(cfg, GPTConfig)  # train.py's own: every GPTConfig key it has
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args, vocab_size=vocab + (-vocab % 64)))
    return cfg, model, vocab


def train_records(out_dir, *args, env=None):
    """The train records of train.py (args: the script or code, then flags) run into out_dir."""
    python(*args, f"--out_dir={out_dir}", env=env)
    return [r for r in report.read_metrics(os.path.join(out_dir, "metrics.jsonl"))
            if r["type"] == "train"]


def train_loop(dtype, iters, log_interval, tmp):
    """train.py itself, in a fresh out_dir: the tokens/s it logs (eval and checkpoint time
    excluded), median over its log windows after the first (warm-up)."""
    records = train_records(tempfile.mkdtemp(dir=tmp), "train.py", *TRAIN_CONFIGS,
                            f"--dtype={dtype}", f"--max_iters={iters}",
                            f"--log_interval={log_interval}", f"--eval_interval={iters}",
                            "--eval_iters=1", f"--ckpt_interval={iters}")
    return statistics.median(r["tokens_per_sec"] for r in records if r["iter"] > log_interval)


def train_bare(dtype, iters, log_interval):
    """The same model and batch trained by the least code possible (forward, backward, clip, AdamW
    step): median tokens/s over log_interval-step windows after the first."""
    cfg, model, vocab = cpu_run()
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, vocab, (2, cfg["batch_size"], cfg["block_size"]), generator=g)

    def window():
        for _ in range(log_interval):
            train_step(model, optimizer, x, y, configurator.DTYPES[dtype], clip=True)
    window()  # warm-up
    seconds = interleaved({"bare": window}, iters // log_interval - 1)["bare"]
    return log_interval * x.numel() / seconds


def bench_train(rounds=3, iters=40, log_interval=10):
    """train.py's whole loop (data, logging, eval, checkpoints) against a bare step of its model,
    each in a fresh process, fp32 and bf16 autocast; and MFU against this CPU's matmul peak."""
    cfg, model, _ = cpu_run()
    print(f"configs/method3.py + configs/cpu.py on CPU ({torch.get_num_threads()} threads): "
          f"{model.config}, batch {cfg['batch_size']}; {rounds} interleaved rounds of {iters} "
          f"iterations, median tokens/s over {log_interval}-iteration windows after the first")
    dtypes, runs = ["float32", "bfloat16"], {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for d in dtypes:
            bare = f"import bench\nprint(bench.train_bare({d!r}, {iters}, {log_interval}))"
            runs[f"{d} loop"] = functools.partial(train_loop, d, iters, log_interval, tmp)
            runs[f"{d} bare"] = functools.partial(run_python, bare)
        tps = interleaved(runs, rounds, timed=False, progress=True)
    rows = []
    for d in dtypes:
        loop, bare = tps[f"{d} loop"], tps[f"{d} bare"]
        peak = measure_cpu_matmul_flops(configurator.DTYPES[d])
        mfu = [f"{model.estimate_mfu(t, peak):.1%}" for t in (loop, bare)]
        rows.append([d, f"{loop:,.0f}", f"{bare:,.0f}", f"{loop / bare:.3f}", ">= 0.95",
                     loop / bare >= 0.95, f"{peak / 1e9:.1f}", *mfu])
    table("train", ["dtype", "loop tokens/s", "bare tokens/s", "loop / bare", "target", "result",
                    "matmul peak GFLOP/s", "loop MFU", "bare MFU"], rows)


def generation(model, vocab, new_tokens, use_cache):
    """A function that generates new_tokens from one token, batch 1, with or without the cache, on
    the model's device."""
    device = next(model.parameters()).device
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    return functools.partial(model.generate, prompt, new_tokens, temperature=1.0, top_k=200,
                             use_cache=use_cache, vocab_size=vocab,
                             generator=torch.Generator(device=device).manual_seed(0))


def bench_sample(new_tokens=256, rounds=5, long_tokens=1024, long_block=512, long_rounds=3):
    """Generation with and without the KV cache: the CPU run's model (block 128) with a floor for
    the cached step, which at batch 1 reads every weight once per token for little arithmetic (the
    recomputed window reuses each weight once per position). Then every mode at block 512, where
    the window is long enough for the cache to pay."""
    _, model, vocab = cpu_run()
    model.eval()
    linears = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    one_position = {n: torch.randn(1, 1, n) for n in {lin.in_features for lin in linears}}
    weight_mb = sum(lin.weight.nbytes for lin in linears) / 1e6

    def weight_reads():  # each weight matrix applied to one position, in model order, per token
        for _ in range(new_tokens):
            for lin in linears:
                lin(one_position[lin.in_features])

    runs = {"KV cache": generation(model, vocab, new_tokens, True),
            "no cache": generation(model, vocab, new_tokens, False),
            "weight reads only": weight_reads}
    print(f"configs/method3.py + configs/cpu.py model ({model.config}), batch 1, "
          f"{new_tokens} new tokens, {rounds} interleaved rounds, median")
    with torch.inference_mode():
        tps = {name: new_tokens / s for name, s in interleaved(runs, rounds).items()}
    reads = tps["weight reads only"]
    print(f"weights read per cached token: {weight_mb:.1f} MB ({weight_mb * reads / 1e3:.1f} GB/s "
          f"in the weight-reads-only run); the cached step takes {reads / tps['KV cache']:.2f}x as "
          "long as those reads")
    rows = [[f"block 128, mode 3: {name}", f"{t:.0f}", f"{t / tps['no cache']:.2f}"]
            for name, t in tps.items()]
    rows[0] += ["(weight-read bound)"]
    runs = {}
    for mode in range(len(MODES)):
        _, model, vocab = cpu_run(f"--residual_mode={mode}", f"--block_size={long_block}")
        for cache in (True, False):
            runs[mode, cache] = generation(model.eval(), vocab, long_tokens, cache)
    print(f"every mode at block {long_block}, {long_tokens} new tokens, {long_rounds} rounds",
          flush=True)
    with torch.inference_mode():
        seconds = interleaved(runs, long_rounds)
    for mode in range(len(MODES)):
        speedup = seconds[mode, False] / seconds[mode, True]
        rows.append([f"block {long_block}, mode {mode}: KV cache",
                     f"{long_tokens / seconds[mode, True]:.0f}",
                     f"{speedup:.2f}", ">= 5x", speedup >= 5])
    table("sample", ["generation", "tokens/s", "x no cache", "target", "result"], rows)


# -----------------------------------------------------------------------------
# gpu: the CUDA paths, at the note's model size, in about five minutes

def bench_gpu(steps=12, tokens=256):
    """On one CUDA GPU: every mode compiled in bf16 (tokens/s, MFU, peak memory), fp16 with a
    GradScaler, exact resume through train.py, cached generation, and what the full run costs."""
    if not torch.cuda.is_available():
        print("gpu: no CUDA GPU here; skipped (run it on a machine with one)")
        return
    cfg = configurator.defaults("train.py")  # the note's model
    args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "mlp_hidden", "block_size")}
    peak, source = peak_flops("cuda", torch.bfloat16)
    print(f"device {torch.cuda.get_device_name()}, dtype bfloat16 (auto: "
          f"{configurator.resolve_dtype('auto', 'cuda')}), peak {(peak or 0) / 1e12:.0f} TFLOP/s "
          f"({source}), {args}")
    x = torch.randint(0, 50257, (cfg["batch_size"], cfg["block_size"] + 1), device="cuda")
    x, y = x[:, :-1], x[:, 1:]
    rows, base = [], None
    strict_compile()
    for mode in range(len(MODES)):
        torch._dynamo.reset()  # a fresh count of compiles for each mode's model
        torch.cuda.reset_peak_memory_stats()  # the last mode's model is freed by now
        model, optimizer = model_make(GPT, x, y, True, torch.bfloat16, **args, residual_mode=mode,
                                      vocab_size=50304)
        step = functools.partial(train_step, model, optimizer, x, y, torch.bfloat16)
        seconds = interleaved({"step": lambda: [step() for _ in range(steps)]}, 3,
                              torch.cuda.synchronize)["step"] / steps
        tps, memory = x.numel() / seconds, torch.cuda.max_memory_allocated()
        base = base or (tps, memory)
        mfu = f"{model.estimate_mfu(tps, peak):.1%}" if peak else "n/a"
        rows.append([f"mode {mode} bf16 compiled", f"{tps:,.0f}", f"{tps / base[0]:.3f}", mfu,
                     f"{memory / 2**30:.1f} GiB", f"{memory / base[1]:.3f}"])
        if mode == 3:
            per_iter = x.numel() * cfg["gradient_accumulation_steps"]  # tokens
            full = math.ceil(cfg["max_epochs"] * 14.7e6 / per_iter)
            eta = full * per_iter / tps
            print(f"python train.py configs/method3.py: ~{full} iters of pystdlib (14.7M gpt2 "
                  f"tokens x {cfg['max_epochs']:g} epochs), about {eta / 60:.0f} min of training")
            gen = {c: generation(model.eval(), 50257, tokens, c) for c in (True, False)}
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                gen_s = interleaved(gen, 3, torch.cuda.synchronize)
            rows.append(["generation, KV cache vs none", f"{tokens / gen_s[True]:.0f}",
                         f"{gen_s[False] / gen_s[True]:.2f}x"])
            del gen  # it holds the model
        del model, optimizer, step
    for mode in (0, 3):  # fp16: the loss must stay finite under the scaler
        model = GPT(GPTConfig(**args, residual_mode=mode, vocab_size=50304)).cuda()
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cuda")
        scaler = torch.amp.GradScaler()
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.float16):
                _, loss = model(x, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        rows.append([f"mode {mode} fp16 + GradScaler, 5 steps", f"loss {loss.item():.3f}",
                     f"scale {scaler.get_scale():.0f}", math.isfinite(loss.item())])
        del model, optimizer
    rows.append(["resume on CUDA, 20 vs 10 + 10 steps", *gpu_resume()])
    table("gpu", ["measure", "tokens/s or value", "x mode 0", "MFU", "peak memory", "x mode 0"],
          rows)


def gpu_resume():
    """train.py with deterministic algorithms: 20 iterations, and 10 + 10 from a checkpoint."""
    code = ("import runpy, sys, torch\ntorch.use_deterministic_algorithms(True)\n"
            "sys.argv = ['train.py'] + sys.argv[1:]\n"
            "runpy.run_path('train.py', run_name='__main__')")
    common = ["-c", code, "configs/method3.py", "--dataset=pystdlib_byte", "--compile=false",
              "--max_epochs=0", "--lr_decay_iters=20", "--log_interval=1", "--eval_interval=10",
              "--ckpt_interval=10", "--batch_size=4"]
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    with tempfile.TemporaryDirectory() as tmp:
        whole = train_records(f"{tmp}/whole", *common, "--max_iters=20", env=env)
        train_records(f"{tmp}/split", *common, "--max_iters=10", env=env)
        split = train_records(f"{tmp}/split", *common, "--max_iters=20", "--init_from=resume",
                              env=env)
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(whole, split))
    return [f"max loss difference {diff:.3g}", "equal" if diff == 0 else "not bitwise equal"]


SECTIONS = {"model": bench_model, "prepare": bench_prepare, "train": bench_train,
            "sample": bench_sample, "gpu": bench_gpu}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    if not set(names) <= set(SECTIONS):
        sys.exit(f"bench.py: unknown section in {names}; choose from {', '.join(SECTIONS)}")
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        SECTIONS[name]()
