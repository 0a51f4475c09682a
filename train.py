"""
Train a GPT in one of the residual modes of model.py, on one CPU or GPU or on several through DDP.

    python train.py configs/method3.py                           # the original experiment, method 3
    python train.py configs/method3.py configs/cpu.py            # the same, small enough for a laptop CPU
    python train.py configs/method3.py --init_from=resume        # continue an interrupted run exactly
    torchrun --standalone --nproc_per_node=4 train.py configs/method3.py

Every global in the config block below can be set by config files (Python files of assignments) and
then by --key=value flags, read left to right: later ones win.

Writes to out_dir (rank 0 only): config.json (the resolved config), metrics.jsonl (one JSON record per
log line, eval and finish), ckpt.pt, and at the end layer_weights.{json,txt,png}.
"""
import builtins
import contextlib
import difflib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as model_lib
import prepare

# -----------------------------------------------------------------------------
# config: the defaults. Config files and --key=value flags override them.
# data and output
dataset = "pystdlib"  # a folder in data_dir made by prepare.py; built-in corpora are prepared on first use
data_dir = "data"
out_dir = "out"
# model (see model.py)
residual_mode = 0  # 0 standard, 1 mlp_mean, 2 attn_mean, 3 mlp_learned; the names work too
n_layer = 12
n_head = 12
n_embd = 768
mlp_hidden = 0  # MLP width; 0 means 4 * n_embd
block_size = 1024  # tokens of context; a training window holds block_size + 1 tokens
dropout = 0.0
bias = True  # biases in Linears and LayerNorms, like GPT-2
# batch and budget
batch_size = 8  # windows per micro-step per process
gradient_accumulation_steps = 4  # micro-steps per iteration over all processes: DDP splits them up
max_iters = 5000  # optimizer steps; ignored when max_epochs > 0
max_epochs = 0.0  # > 0: train this many passes over the training windows instead (the original did 5)
# AdamW with linear warmup, then cosine decay to min_lr
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
lr_decay_iters = 0  # the iteration at which the decay reaches min_lr; 0 means the end of the run
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 turns clipping off
layer_weight_lr_mult = 1.0  # mode 3: learning-rate multiplier of the layer-weight logits
# evaluation, logging, checkpoints
eval_interval = 250  # evaluate every this many iterations, and at the end
eval_iters = 20  # validation batches of batch_size windows: a fixed set, the same in every run
log_interval = 10
ckpt_interval = 250  # save out_dir/ckpt.pt every this many iterations, and at the end
init_from = "scratch"  # "scratch", or "resume" from out_dir/ckpt.pt
seed = 1337  # model init and the order of the training windows
# system
device = "auto"  # auto: cuda, else mps, else cpu; or e.g. "cuda:1"
dtype = "auto"  # auto: bfloat16 where native, float16 on older GPUs, float32 otherwise; or one of those
compile = True  # torch.compile the model; falls back to eager, with a message, where it is unavailable
backend = "auto"  # DDP backend: auto is nccl on GPU, gloo on CPU
peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0 looks it up (GPU table) or measures it (CPU)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(Exception):
    """Bad config file or flag: main() prints it as one line."""


class CheckpointError(Exception):
    """Unreadable or mismatched checkpoint: main() prints it as one line."""


class NonFiniteLoss(Exception):
    """The loss went nan or inf: main() prints it as one line."""


# -----------------------------------------------------------------------------
# config loading

def load_config(argv):
    """argv: config files and --key=value flags, applied left to right -> dict of every config key."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")  # partition: a value may contain "="
            if not eq:
                raise ConfigError(f"flag {arg!r} needs a value: --{key}=VALUE")
            check_key(key, arg)
            cfg[key] = check_value(key, parse_flag(key, text), arg)
        else:
            for key, value in read_config_file(arg, cfg).items():
                check_key(key, arg)
                cfg[key] = check_value(key, value, arg)
    return cfg


def read_config_file(path, cfg):
    """Runs a config file (plain Python assignments, like nanoGPT's) -> its public global names. The file
    sees the config so far, so an overlay can build on it: out_dir = out_dir + "_cpu"."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (flags look like --key=value)")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = dict(cfg)
    try:
        # builtins.compile: the config global `compile` shadows the builtin in this module
        exec(builtins.compile(source, path, "exec"), namespace)
    except Exception as e:
        where = f"{path}:{e.lineno}" if isinstance(e, SyntaxError) else path
        raise ConfigError(f"config file {where} failed: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def check_key(key, source):
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "the keys are the globals at the top of train.py"
        raise ConfigError(f"unknown config key {key!r} in {source}; {hint}")


def parse_flag(key, text):
    """Text of --key=text -> a value of the default's type (checked again by check_value)."""
    default = DEFAULTS[key]
    try:
        if key == "residual_mode" or isinstance(default, str):
            return text
        if isinstance(default, bool):
            return {"true": True, "false": False}[text.lower()]
        if isinstance(default, int):
            return int(text)
        return float(text)
    except (KeyError, ValueError):
        raise ConfigError(f"--{key}={text}: expected {type_name(default)}") from None


def check_value(key, value, source):
    """Type-checks a value against the default's type: an int may stand for a float, a bool for nothing else."""
    default = DEFAULTS[key]
    if key == "residual_mode":
        try:
            return model_lib.parse_residual_mode(value)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{source} sets {key} = {value!r}: expected {type_name(default)}")
    return value


def type_name(default):
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]


def validate(cfg):
    """Value checks that would otherwise fail deep inside torch."""
    positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                "eval_interval", "eval_iters", "log_interval", "ckpt_interval"]
    for key in positive:
        if cfg[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"n_embd ({cfg['n_embd']}) must be divisible by n_head ({cfg['n_head']})")
    if cfg["init_from"] not in ("scratch", "resume"):
        raise ConfigError(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")
    if cfg["dtype"] not in ("auto", *DTYPES):
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {cfg['dtype']!r}")
    if cfg["max_epochs"] <= 0 and cfg["max_iters"] <= 0:
        raise ConfigError("set max_iters or max_epochs to a positive budget")


# -----------------------------------------------------------------------------
# device and precision

def resolve_device(name):
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}, but this torch sees no CUDA GPU; use --device=cpu (or auto)")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: bf16 matmuls at full speed. Without them, bf16 on CPU is emulated and slow."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch
        return False


def resolve_dtype(name, device_type):
    if name != "auto":
        return name
    if device_type == "cuda":  # Ampere (8.x) and newer do bf16 natively; older GPUs need fp16 + GradScaler
        return "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


# -----------------------------------------------------------------------------
# data: the splits are read as one long token stream. Window w is tokens [w*T, w*T + T + 1) of it, so
# consecutive windows share one token (the last target of one is the first input of the next) and a
# window may run across documents and shards.

def open_dataset(cfg, master, ddp):
    """-> (meta, train shards, val shards). Prepares a built-in corpus on first use."""
    path = os.path.join(cfg["data_dir"], cfg["dataset"])
    builtin = prepare.builtin_dataset(cfg["dataset"])
    if not os.path.exists(path) and builtin is not None:
        if master:
            sources, tokenizer = builtin
            print(f"train.py: dataset {cfg['dataset']!r} is not prepared yet; preparing it in {path} now", flush=True)
            prepare.prepare(sources, name=cfg["dataset"], tokenizer=tokenizer, data_dir=cfg["data_dir"])
        if ddp:
            dist.barrier()  # the other ranks wait for rank 0's preparation
    meta = prepare.read_meta(path)  # a missing dataset: a DataError that names the prepare.py command
    return meta, prepare.open_split(path, "train", meta), prepare.open_split(path, "val", meta)


class TokenStream:
    """The shards of a split as one stream of tokens, cut into windows of T + 1 tokens."""

    def __init__(self, shards, T):
        self.shards, self.T = shards, T
        self.starts = np.cumsum([0] + [len(s) for s in shards])  # stream offset of each shard
        self.num_tokens = int(self.starts[-1])
        self.num_windows = max(0, (self.num_tokens - 1) // T)

    def window(self, w):
        """(T + 1,) tokens of window w, pieced together where it runs across shards."""
        start, need, pieces = w * self.T, self.T + 1, []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while need:
            piece = self.shards[i][start - self.starts[i]:start - self.starts[i] + need]
            pieces.append(piece)
            need -= len(piece)
            start += len(piece)
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def batch(self, window_ids, device):
        """-> x, y: (B, T) inputs and next-token targets on device."""
        buf = np.empty((len(window_ids), self.T + 1), dtype=np.int64)
        for row, w in enumerate(window_ids):
            buf[row] = self.window(int(w))
        b = torch.from_numpy(buf)
        if device.type == "cuda":  # pinned memory lets the copy overlap with compute
            b = b.pin_memory().to(device, non_blocking=True)
        else:
            b = b.to(device)
        return b[:, :-1].contiguous(), b[:, 1:].contiguous()  # (B, T) inputs, (B, T) targets


class TrainOrder:
    """Epoch e visits every training window once, in a shuffled order seeded by (seed, e). A run's data
    position is the number of windows consumed so far, so resuming needs nothing but that number."""

    def __init__(self, num_windows, seed):
        self.num_windows, self.seed = num_windows, seed
        self.epoch, self.order = None, None

    def ids(self, pos, count):
        """Window ids at positions pos .. pos+count-1 of the run; runs on into the next epoch if needed."""
        out = []
        while count:
            epoch, i = divmod(pos, self.num_windows)
            if epoch != self.epoch:
                self.epoch, self.order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            take = min(count, self.num_windows - i)
            out.append(self.order[i:i + take])
            pos, count = pos + take, count - take
        return np.concatenate(out)


def eval_window_ids(num_windows, count):
    """A fixed set of validation windows spread evenly over the split: it depends only on the data,
    block_size and the count, never on the mode, seed, DDP or a resume, so every run is scored alike."""
    count = min(count, num_windows)
    return np.linspace(0, num_windows - 1, count).round().astype(np.int64)


def unigram_entropy(shards, vocab_size, max_tokens=100_000_000):
    """Entropy in nats/token of the split's token frequencies: the loss of a model that ignores context,
    the mark a model that learns anything must beat. Big splits are estimated from their first 100M tokens."""
    counts, left = np.zeros(vocab_size, dtype=np.int64), max_tokens
    for s in shards:
        counts += np.bincount(s[:left], minlength=vocab_size)
        left -= min(left, len(s))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, stream, window_ids, batch_size, autocast, device, rank, world_size):
    """Mean next-token loss and top-1 accuracy over the fixed validation windows. DDP ranks take
    every world_size-th batch and the sums are added across ranks."""
    model.eval()
    t0 = time.perf_counter()
    batches = [window_ids[i:i + batch_size] for i in range(0, len(window_ids), batch_size)]
    loss_sum = correct = tokens = 0.0
    for ids in batches[rank::world_size]:
        x, y = stream.batch(ids, device)
        with autocast:
            logits, loss = model(x, y)  # logits: (B, T, V); loss: mean over B*T, in fp32 under autocast
        loss_sum += loss.item() * y.numel()
        correct += (logits.argmax(dim=-1) == y).sum().item()
        tokens += y.numel()
    if world_size > 1:
        totals = torch.tensor([loss_sum, correct, tokens], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, correct, tokens = totals.tolist()
    model.train()
    runtime = time.perf_counter() - t0
    eval_loss = loss_sum / tokens
    return {
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
        "eval_accuracy": correct / tokens,
        "eval_runtime": runtime,
        "eval_samples": len(window_ids),
        "eval_samples_per_second": len(window_ids) / runtime,
        "eval_steps_per_second": len(batches) / runtime,
    }


def format_eval(iter_num, epoch, metrics):
    """The block the original experiment printed (Hugging Face Trainer's layout)."""
    h, rest = divmod(metrics["eval_runtime"], 3600)
    m, s = divmod(rest, 60)
    rows = [("epoch", f"{epoch:.4f}"),
            ("eval_accuracy", f"{metrics['eval_accuracy']:.4f}"),
            ("eval_loss", f"{metrics['eval_loss']:.4f}"),
            ("eval_perplexity", f"{metrics['eval_perplexity']:.4f}"),
            ("eval_runtime", f"{int(h)}:{int(m):02d}:{s:05.2f}"),
            ("eval_samples", f"{metrics['eval_samples']}"),
            ("eval_samples_per_second", f"{metrics['eval_samples_per_second']:.3f}"),
            ("eval_steps_per_second", f"{metrics['eval_steps_per_second']:.3f}")]
    width = max(len(v) for _, v in rows)
    return f"***** eval metrics (iter {iter_num}) *****\n" + "\n".join(f"  {k:<23} = {v:>{width}}" for k, v in rows)


# -----------------------------------------------------------------------------
# learned layer weights (mode 3)

def layer_weight_rows(raw_model):
    """One row per block: index, count, raw theta_m and softmax(theta_m); count 0 and nulls where a
    block has no weights (block 0, and every block outside mode 3)."""
    rows = []
    for m, (theta, w) in enumerate(zip(raw_model.layer_logits(), raw_model.layer_weights())):
        if theta is None:
            rows.append({"index": m, "count": 0, "raw": None, "normalized": None})
        else:
            rows.append({"index": m, "count": theta.numel(), "raw": theta.detach().float().cpu().tolist(),
                         "normalized": w.tolist()})
    return rows


def format_layer_weights(rows):
    """Compact, aligned: block m's weights over blocks 0..m, one line per block."""
    lines = ["layer weights, softmax(theta_m) over blocks 0..m (block 0 has none):"]
    for r in rows:
        if r["count"]:
            lines.append(f"  block {r['index']:>2}: " + " ".join(f"{w:.3f}" for w in r["normalized"]))
    return "\n".join(lines)


def write_layer_weights(out, rows, model_args, saved_at):
    """layer_weights.json (the shape of the original's file), .txt (its readable report) and .png."""
    config = {k: model_args[k] for k in ("n_layer", "n_embd", "n_head", "mlp_hidden", "residual_mode")}
    doc = {"saved_at": saved_at, "config": config, "layers": rows}
    atomic_write(os.path.join(out, "layer_weights.json"), lambda f: f.write(json.dumps(doc, indent=1).encode()))
    mode_name = {v: k for k, v in model_lib.RESIDUAL_MODES.items()}[config["residual_mode"]]
    lines = [f"Learned layer weights (residual_mode {config['residual_mode']}, {mode_name})",
             f"Saved at: {saved_at}", "",
             "Model configuration:",
             f"  layers: {config['n_layer']}",
             f"  hidden size: {config['n_embd']}",
             f"  attention heads: {config['n_head']}",
             f"  MLP (intermediate) size: {config['mlp_hidden']}", ""]
    for r in rows:
        if not r["count"]:
            lines.append(f"Layer {r['index']} (index {r['index']}): no weight parameters")
            continue
        lines += [f"Layer {r['index']} (index {r['index']}): {r['count']} weight parameters",
                  f"  raw weights: {r['raw']}",
                  f"  normalized weights: {r['normalized']}"]
    atomic_write(os.path.join(out, "layer_weights.txt"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    if any(r["count"] for r in rows):
        plot_layer_weights(os.path.join(out, "layer_weights.png"), rows, mode_name)


def plot_layer_weights(path, rows, mode_name):
    """Lower-triangular heatmap: row m holds block m's weights over blocks 0..m."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("train.py: matplotlib is not installed, so no layer_weights.png (pip install matplotlib)", flush=True)
        return
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.55 * n), max(4.0, 1.0 + 0.5 * n)))
    weights = [r["normalized"] if r["count"] else None for r in rows]
    draw_layer_heatmap(fig, ax, weights, 2, f"learned weights softmax(theta_m), residual_mode {mode_name}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def draw_layer_heatmap(fig, ax, weights, digits, title):
    """weights[m]: block m's weights over blocks 0..m, or None. Drawn lower-triangular, row m = block m,
    blank where a block has none (also used by compare.py)."""
    n = len(weights)
    grid = np.full((n, n), np.nan)  # (block m, source block i); nan stays blank
    for m, row in enumerate(weights):
        if row is not None:
            grid[m, :len(row)] = row
    image = ax.imshow(grid, cmap="viridis", vmin=0.0)
    if n <= 16:
        for m in range(n):
            for i in range(n):
                if not np.isnan(grid[m, i]):
                    ax.text(i, m, f"{grid[m, i]:.{digits}f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("block i whose MLP input a_i is mixed in")
    ax.set_ylabel("block m")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)


# -----------------------------------------------------------------------------
# files and checkpoints

def atomic_write(path, write):
    """write(f) into a temporary file beside path, fsync, rename over path: a crash at any moment
    leaves either the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_states(ddp):
    """Every rank's torch RNG states, gathered to all ranks (dropout draws from them)."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}
    if not ddp:
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def load_checkpoint(path, model_args, tokenizer):
    """Reads out_dir/ckpt.pt (tensors and plain data only) and checks it fits this config."""
    if not os.path.exists(path):
        raise CheckpointError(f"init_from=resume, but there is no checkpoint at {path}; start with init_from=scratch")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: loading runs no code
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {first}); it is corrupt or "
                              f"not a train.py checkpoint: delete it, or point out_dir elsewhere") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != 1:
        raise CheckpointError(f"{path} is not a train.py checkpoint (format_version 1); point out_dir elsewhere")
    mismatched = [f"{k}={ckpt['model_args'].get(k)!r} in the checkpoint but {v!r} in the config"
                  for k, v in model_args.items() if k != "dropout" and ckpt["model_args"].get(k) != v]
    if ckpt["tokenizer"] != tokenizer:
        mismatched.append(f"tokenizer {ckpt['tokenizer']} in the checkpoint but {tokenizer} in the dataset")
    if mismatched:
        raise CheckpointError(f"checkpoint {path} does not match the config: {'; '.join(mismatched)}. "
                              "Use the run's own config, or another out_dir")
    return ckpt


def read_metrics(path):
    """Records of an earlier metrics.jsonl, skipping a line torn by a crash."""
    records = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    return records


# -----------------------------------------------------------------------------
# learning rate, signals, small helpers

def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / (cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


STOP = {"signal": 0}  # set by SIGINT / SIGTERM; the loop finishes its step, saves and exits


def request_stop(signum, frame):
    if STOP["signal"]:  # the second signal: stop at once, keeping the last checkpoint
        raise SystemExit(f"train.py: {signal.Signals(signum).name} again; exiting without saving")
    STOP["signal"] = signum


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError):  # Linux: VmHWM is this process image's own peak, while ru_maxrss
        with open("/proc/self/status") as f:  # also counts the parent's size when it forked us
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def compile_or_fallback(raw_model, x, y, autocast):
    """torch.compile, tried on one real step: compilation happens lazily, so a missing compiler or an
    unsupported platform only shows up then. On failure: a message, and the eager model."""
    compiled = torch.compile(raw_model)
    # the trial step leaves no trace: the same random numbers after it (fork_rng), no gradients
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        try:
            with autocast:
                _, loss = compiled(x, y)
            loss.backward()
            return compiled
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            print(f"train.py: torch.compile is unavailable here ({type(e).__name__}: {first}); "
                  "training without it (set compile=false to skip the attempt)", flush=True)
            return raw_model
        finally:
            raw_model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# setup

def setup_distributed(cfg):
    """-> (ddp, rank, local_rank, world_size). Under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE)
    joins the process group, nccl on GPU and gloo on CPU; each GPU process takes its local rank's GPU."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    on_gpu = cfg["device"].startswith("cuda")
    if on_gpu:
        cfg["device"] = f"cuda:{local_rank}"
        torch.cuda.set_device(cfg["device"])
    dist.init_process_group(backend=cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if on_gpu else "gloo"))
    return True, rank, local_rank, world_size


def restore_rng(states, rank, world_size, device, log):
    """This rank's random state from the checkpoint, so that dropout continues where it stopped."""
    if len(states) != world_size:
        log(f"train.py: the checkpoint holds {len(states)} processes' random states, this run has {world_size}; "
            "dropout masks will differ from an uninterrupted run")
        return
    torch.set_rng_state(states[rank]["cpu"])
    if states[rank]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states[rank]["cuda"])


def open_metrics(path, ckpt, iter_num):
    """metrics.jsonl for appending. A fresh run starts it afresh; a resumed one keeps the records up to its
    checkpoint (a crash may have logged past it, and those iterations run again: no record is doubled)."""
    kept = [] if ckpt is None else [r for r in read_metrics(path) if r.get("type") != "done" and r.get("iter", 0) <= iter_num]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    return open(path, "a", encoding="utf-8")


def format_log(rec, max_iters):
    mfu = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
    return (f"iter {rec['iter']}/{max_iters} | epoch {rec['epoch']:.3f} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"grad norm {rec['grad_norm']:.3f} | {rec['tokens_per_sec']:,.0f} tok/s | mfu {mfu} | "
            f"{hms(rec['elapsed'])} elapsed, eta {hms(rec['eta'])}")


# -----------------------------------------------------------------------------

def main(argv):
    cfg = load_config(argv)
    validate(cfg)
    cfg["device"] = resolve_device(cfg["device"])
    ddp, rank, local_rank, world_size = setup_distributed(cfg)
    master = rank == 0  # rank 0 alone prints and writes
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    device = torch.device(cfg["device"])
    cfg["dtype"] = resolve_dtype(cfg["dtype"], device.type)  # decided after every override
    if cfg["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be a "
                          f"multiple of the number of processes ({world_size})")
    accum = cfg["gradient_accumulation_steps"] // world_size  # micro-steps per process
    B, T = cfg["batch_size"], cfg["block_size"]
    if device.type == "cuda":  # TF32 for what stays in fp32 (nanoGPT does the same)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = DTYPES[cfg["dtype"]]
    autocast = contextlib.nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)

    # data
    meta, train_shards, val_shards = open_dataset(cfg, master, ddp)
    train_data, val_data = TokenStream(train_shards, T), TokenStream(val_shards, T)
    if train_data.num_windows == 0 or val_data.num_windows == 0:
        raise prepare.DataError(f"dataset {cfg['dataset']!r} is too small for one window of block_size + 1 = {T + 1} "
                                f"tokens (train {train_data.num_tokens}, val {val_data.num_tokens}); lower block_size")
    windows_per_iter = B * accum * world_size  # the global batch
    if cfg["max_epochs"] > 0:
        cfg["max_iters"] = math.ceil(cfg["max_epochs"] * train_data.num_windows / windows_per_iter)
    if cfg["lr_decay_iters"] <= 0:
        cfg["lr_decay_iters"] = cfg["max_iters"]
    cfg["mlp_hidden"] = cfg["mlp_hidden"] or 4 * cfg["n_embd"]
    max_iters = cfg["max_iters"]
    order = TrainOrder(train_data.num_windows, cfg["seed"])
    val_ids = eval_window_ids(val_data.num_windows, cfg["eval_iters"] * B)
    tokenizer = {"name": meta["tokenizer"], "vocab_size": meta["vocab_size"], "eot_token": meta["eot_token"]}
    epoch_of = lambda pos: pos / train_data.num_windows  # noqa: E731

    def batch_at(pos, micro_step):
        """Micro-step j of rank r in the iteration that starts at data position pos: the ranks take turns,
        so together they cover the global batch exactly as one process with all the micro-steps would."""
        return train_data.batch(order.ids(pos + (micro_step * world_size + rank) * B, B), device)

    # model and optimizer, fresh or from the checkpoint. The vocabulary is padded up to a multiple of 64
    # for faster matmuls; the extra logits are never targets, so training pushes them down
    model_args = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "mlp_hidden", "block_size", "dropout",
                                       "bias", "residual_mode")}
    model_args["vocab_size"] = -(-meta["vocab_size"] // 64) * 64
    out = cfg["out_dir"]
    ckpt_path = os.path.join(out, "ckpt.pt")
    ckpt = None
    if cfg["init_from"] == "resume":
        ckpt = load_checkpoint(ckpt_path, model_args, tokenizer)
    elif os.path.exists(ckpt_path):
        raise CheckpointError(f"{ckpt_path} exists; continue it with --init_from=resume, or delete it / "
                              "choose another out_dir to start from scratch")
    torch.manual_seed(cfg["seed"] + rank)
    raw_model = model_lib.GPT(model_lib.GPTConfig(**model_args))
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(device)
    optimizer = raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                               device.type, cfg["layer_weight_lr_mult"])
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)  # fp16 needs loss scaling
    iter_num, data_pos, elapsed_before, best_val_loss, last_eval = 0, 0, 0.0, float("inf"), None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"], rank, world_size, device, log)
        iter_num, data_pos, elapsed_before = ckpt["iter_num"], ckpt["data_pos"], ckpt["elapsed"]
        best_val_loss, last_eval = ckpt["best_val_loss"], ckpt["last_eval"]
        changed = [k for k in ("seed", "batch_size", "gradient_accumulation_steps", "learning_rate", "min_lr",
                               "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "dtype")
                   if ckpt["config"].get(k) != cfg[k]]
        log(f"resuming {ckpt_path} at iter {iter_num}" + (f"; changed since: {', '.join(changed)}" if changed else ""))
        if iter_num >= max_iters:
            log(f"train.py: the run in {out} already finished at iter {iter_num} (max_iters {max_iters}); "
                "raise max_iters or max_epochs to train further")
            return 0
    last_ckpt_iter = iter_num if ckpt is not None else None

    # output files: rank 0 only
    metrics_file = None
    if master:
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, "config.json"), lambda f: f.write(json.dumps(cfg, indent=1).encode()))
        metrics_file = open_metrics(os.path.join(out, "metrics.jsonl"), ckpt, iter_num)

    def record(rec):
        if master:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

    # compile (tried on the first micro-batch), then DDP around it
    x, y = batch_at(data_pos, 0)
    model = compile_or_fallback(raw_model, x, y, autocast) if cfg["compile"] else raw_model
    eval_model = model  # evaluation bypasses DDP: no gradients, no collectives inside
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    peak = cfg["peak_flops"] or model_lib.peak_flops(device, ptdtype)  # for MFU; None: an unknown device

    num_params = raw_model.num_params()
    entropy = unigram_entropy(train_shards, meta["vocab_size"]) if master else None
    if master:
        print(f"model: residual_mode {cfg['residual_mode']}, {num_params / 1e6:.2f}M parameters, device {device}, "
              f"{cfg['dtype']}, compile {'on' if eval_model is not raw_model else 'off'}"
              + (f", DDP x{world_size}" if ddp else ""))
        print(f"data: {train_data.num_tokens:,} train tokens = {train_data.num_windows:,} windows of {T + 1}, "
              f"{val_data.num_tokens:,} val tokens; unigram entropy {entropy:.4f} nats/token")
        print(f"budget: {max_iters} iters of {windows_per_iter * T:,} tokens = "
              f"{max_iters * windows_per_iter / train_data.num_windows:.2f} epochs; "
              f"eval on {len(val_ids)} fixed val windows", flush=True)
    record({"type": "start", "iter": iter_num, "world_size": world_size, "tokens_per_iter": windows_per_iter * T,
            "train_tokens": train_data.num_tokens, "train_windows": train_data.num_windows,
            "val_tokens": val_data.num_tokens, "num_params": num_params, "unigram_entropy": entropy,
            "resumed": ckpt is not None})

    t_start = time.perf_counter()

    def run_eval():
        nonlocal last_eval, best_val_loss
        metrics = evaluate(eval_model, val_data, val_ids, B, autocast, device, rank, world_size)
        best_val_loss = min(best_val_loss, metrics["eval_loss"])
        last_eval = {"type": "eval", "iter": iter_num, "epoch": epoch_of(data_pos), "tokens": data_pos * T, **metrics}
        record(last_eval)
        log(format_eval(iter_num, epoch_of(data_pos), metrics))
        if cfg["residual_mode"] == 3:
            log(format_layer_weights(layer_weight_rows(raw_model)))

    def save_checkpoint(done):
        states = rng_states(ddp)  # a collective: every rank takes part
        if master:
            ckpt = {"format_version": 1, "model_args": model_args, "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "iter_num": iter_num, "data_pos": data_pos, "rng": states, "config": cfg, "tokenizer": tokenizer,
                    "best_val_loss": best_val_loss, "last_eval": last_eval, "done": done,
                    "elapsed": elapsed_before + time.perf_counter() - t_start}
            atomic_write(ckpt_path, lambda f: torch.save(ckpt, f))
            os.fsync(metrics_file.fileno())  # the metrics up to the checkpoint are on disk too

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, request_stop)
    if ckpt is None:  # the score of the untrained model
        run_eval()

    # the training loop
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # kept on the device: no sync every step
    loss_sum = torch.zeros((), device=device)  # the summed iteration losses since the last log line
    window_start, window_iters, paused = time.perf_counter(), 0, 0.0  # for tokens/s, without eval and saving
    while iter_num < max_iters:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        for micro_step in range(accum):
            last = micro_step == accum - 1
            # DDP: accumulate locally, all-reduce the gradients only on the last micro-step
            with model.no_sync() if ddp and not last else contextlib.nullcontext():
                with autocast:
                    _, loss = model(x, y)
                    loss = loss / accum  # the gradient of the mean over all micro-steps
                # fetch the next micro-batch while the device is still busy with this one
                x, y = batch_at(data_pos + (windows_per_iter if last else 0), 0 if last else micro_step + 1)
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
            nonfinite |= ~torch.isfinite(loss.detach())
        if scaler.is_enabled():
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"] or float("inf"))
        if not scaler.is_enabled():  # with fp16, inf gradients are routine: the scaler skips those steps
            nonfinite |= ~torch.isfinite(grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        data_pos += windows_per_iter
        window_iters += 1

        if ddp:  # stop requests and bad losses are decided by all ranks together: no rank leaves alone
            flags = torch.stack([nonfinite.float(), torch.tensor(float(STOP["signal"]), device=device)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            nonfinite |= flags[0] > 0
            STOP["signal"] = STOP["signal"] or int(flags[1].item())
        is_log = iter_num % cfg["log_interval"] == 0
        is_eval = iter_num % cfg["eval_interval"] == 0 or iter_num == max_iters
        is_ckpt = iter_num % cfg["ckpt_interval"] == 0 or iter_num == max_iters or STOP["signal"]
        if is_log:
            if ddp:  # the mean loss over all ranks, as one process with the same global batch would see it
                dist.all_reduce(loss_sum)  # a sum: gloo has no AVG
                loss_sum /= world_size
            mean_loss = loss_sum.item() / window_iters  # .item() waits for the device, so the timing is true
            dt = time.perf_counter() - window_start - paused
            tokens_per_sec = window_iters * windows_per_iter * T / dt
            rec = {"type": "train", "iter": iter_num, "epoch": epoch_of(data_pos), "tokens": data_pos * T,
                   "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_sec": tokens_per_sec,
                   "mfu": raw_model.estimate_mfu(tokens_per_sec / world_size, peak) if peak else None,
                   "elapsed": elapsed_before + time.perf_counter() - t_start,
                   "eta": (max_iters - iter_num) * dt / window_iters}
            record(rec)
            log(format_log(rec, max_iters))
            loss_sum.zero_()
            window_start, window_iters, paused = time.perf_counter(), 0, 0.0
        if (is_log or is_eval or is_ckpt) and nonfinite.item():
            kept = (f"the last checkpoint ({ckpt_path}, iter {last_ckpt_iter}) is kept" if last_ckpt_iter is not None
                    else "no checkpoint was saved")
            raise NonFiniteLoss(f"the loss or gradient became nan/inf by iter {iter_num}; stopping without saving, "
                                f"{kept}. Lower learning_rate, or raise warmup_iters or grad_clip")
        t_pause = time.perf_counter()
        if is_eval:
            run_eval()
        if is_ckpt:
            save_checkpoint(done=iter_num >= max_iters)
            last_ckpt_iter = iter_num
        paused += time.perf_counter() - t_pause
        if STOP["signal"] and iter_num < max_iters:
            resume = [] if "--init_from=resume" in argv else ["--init_from=resume"]
            log(f"train.py: stopped by {signal.Signals(STOP['signal']).name} at iter {iter_num}; checkpoint saved "
                f"to {ckpt_path}. Resume with: {' '.join(['python', 'train.py', *argv, *resume])}")
            return 128 + STOP["signal"]

    # the end: the learned weights and the final record
    if master:
        write_layer_weights(out, layer_weight_rows(raw_model), model_args, time.strftime("%Y-%m-%d %H:%M:%S"))
        elapsed = elapsed_before + time.perf_counter() - t_start
        record({"type": "done", "iter": iter_num, "epoch": epoch_of(data_pos), "tokens": data_pos * T,
                **{k: v for k, v in last_eval.items() if k.startswith("eval_")}, "best_val_loss": best_val_loss,
                "elapsed": elapsed, "peak_memory_bytes": peak_memory_bytes(device)})
        metrics_file.close()
        log(f"done: {iter_num} iters in {hms(elapsed)}, eval_loss {last_eval['eval_loss']:.4f} (best "
            f"{best_val_loss:.4f}); wrote ckpt.pt, metrics.jsonl and layer_weights.* to {out}")
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except (ConfigError, CheckpointError, NonFiniteLoss, prepare.DataError) as e:
        code = f"train.py: {e}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
