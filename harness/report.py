"""
What a run writes besides its checkpoint, and how it prints: the one atomic file writer,
metrics.jsonl, the log line and eval block, the learned layer weights as json/txt/png, peak memory.
No torch import: prepare.py and compare.py use it without paying for torch.
"""
import contextlib
import glob
import json
import os
import sys

import numpy as np


def atomic_write(path, data):
    """data (bytes, str, or a function writing a binary file) into a temp file beside path, fsync,
    rename over path: a crash at any moment leaves the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # no tmp left after os.replace
            os.remove(tmp)
    fsync_dir(os.path.dirname(path) or ".")


def remove_temporaries(folder):
    """Deletes the temporary files (path.tmpPID) that atomic writes of a killed run left behind."""
    for stale in glob.glob(os.path.join(glob.escape(folder), "*.tmp[0-9]*")):
        os.remove(stale)


def fsync_dir(path):
    """Makes the renames inside path durable (POSIX; a no-op elsewhere)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -----------------------------------------------------------------------------
# metrics.jsonl: one JSON record per line

def read_metrics(path):
    """The records of a metrics.jsonl, skipping a line torn by a crash."""
    records = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    return records


def open_run(out_dir, config, resume_iter=None):
    """Makes out_dir, clears what a run killed inside a write left there, writes config.json, and
    opens metrics.jsonl for appending. A fresh run (resume_iter None) starts it afresh; a resumed
    one keeps the records up to its checkpoint: a crash may have logged past it, and those
    iterations run again, so no record is doubled. A 'done' record goes too: the resumed run writes
    its own."""
    os.makedirs(out_dir, exist_ok=True)
    remove_temporaries(out_dir)
    atomic_write(os.path.join(out_dir, "config.json"), json.dumps(config, indent=1))
    path = os.path.join(out_dir, "metrics.jsonl")
    kept = [] if resume_iter is None else [r for r in read_metrics(path) if r.get("type") != "done"
                                           and r.get("iter", 0) <= resume_iter]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a", encoding="utf-8")


def record(file, rec):
    """Appends one record; file is None on the ranks that do not write."""
    if file is not None:
        file.write(json.dumps(rec) + "\n")
        file.flush()


# -----------------------------------------------------------------------------
# what the terminal shows

def hms(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def format_log(rec, max_iters):
    mfu = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
    return (f"iter {rec['iter']}/{max_iters} | epoch {rec['epoch']:.3f} | loss {rec['loss']:.4f} | "
            f"lr {rec['lr']:.2e} | grad norm {rec['grad_norm']:.3f} | {rec['tokens_per_sec']:,.0f} "
            f"tok/s | mfu {mfu} | {hms(rec['elapsed'])} elapsed, eta {hms(rec['eta'])}")


def format_start(start, config, eval_windows):
    """The start record and the config as lines: model, data, budget, time."""
    ddp = f", DDP x{start['world_size']}" if start["world_size"] > 1 else ""
    epochs = (config["max_iters"] * start["tokens_per_iter"] / config["block_size"]
              / start["train_windows"])
    return (f"model: residual_mode {config['residual_mode']}, {start['num_params'] / 1e6:.2f}M "
            f"parameters, device {config['device']}, {config['dtype']}, compile "
            f"{'on' if config['compile'] else 'off'}{ddp}\n"
            f"data: {start['train_tokens']:,} train tokens = {start['train_windows']:,} windows of "
            f"{config['block_size'] + 1}, {start['val_tokens']:,} val tokens; unigram entropy "
            f"{start['unigram_entropy']:.4f} nats/token\n"
            f"budget: {config['max_iters']} iters of {start['tokens_per_iter']:,} tokens = "
            f"{epochs:.2f} epochs; eval on {eval_windows} fixed val windows\n" + format_cost(start))


def format_cost(start):
    """A floor on the run's time, before the first step: every FLOP at the device's peak (real runs
    reach a fraction of it); on a CPU, where that floor is already hours, the way to a small run."""
    if not start["peak_flops"]:
        return f"time: no floor ({start['peak_source']}); the first iteration will tell"
    floor = start["flops"] / (start["peak_flops"] * start["world_size"])
    line = (f"time: at least {hms(floor)} at the peak, {start['peak_flops'] / 1e12:.2f} TFLOP/s a "
            f"process ({start['peak_source']}); the first iteration will tell")
    if start["peak_source"] == "measured" and floor > 3600:  # measured: a CPU
        line += ("\ntrain.py: this run is sized for a GPU; for a CPU run of minutes add the "
                 "overlay configs/cpu.py: python train.py configs/method3.py configs/cpu.py")
    return line


def format_eval(rec):
    """An eval record as the block the original experiment printed (HF Trainer's layout)."""
    t = rec["eval_runtime"]
    rows = {k: f"{rec[k]:.4f}" for k in ("epoch", "eval_accuracy", "eval_loss", "eval_perplexity")}
    rows["eval_runtime"] = f"{int(t // 3600)}:{int(t % 3600 // 60):02d}:{t % 60:05.2f}"
    rows["eval_samples"] = str(rec["eval_samples"])
    rows.update((k, f"{rec[k]:.3f}") for k in ("eval_samples_per_second", "eval_steps_per_second"))
    width = max(map(len, rows.values()))
    return (f"***** eval metrics (iter {rec['iter']}) *****\n"
            + "\n".join(f"  {k:<23} = {v:>{width}}" for k, v in rows.items()))


# -----------------------------------------------------------------------------
# the learned residual mixing: one row per block (per z_k in mode 6, per sublayer in modes 8 and 9)

def mixing_rows(model):
    """One row per block (per z_k in mode 6): index, count, raw parameters and the weights a heatmap
    shows ('normalized'); count 0 and nulls where a row has none, and in modes without mixing."""
    mixing = model.mixing_weights() or {"rows": None, "raw": [None] * model.config.n_layer}
    weights = mixing["rows"] or [None] * len(mixing["raw"])
    return [{"index": i, "count": 0 if w is None else len(w),
             "raw": None if raw is None else raw.tolist(),
             "normalized": None if w is None else w.tolist()}
            for i, (raw, w) in enumerate(zip(mixing["raw"], weights))]


def format_mixing(rows, mode):
    """Each row's weights, one aligned line per row; '' when no row has any. mode: model.MODES'
    row of the run's residual mode, which says what a row is and holds."""
    lines = [f"  {mode.row} {r['index']:>2}: " + " ".join(f"{w:.3f}" for w in r["normalized"])
             for r in rows if r["count"]]
    return "\n".join([f"{mode.mixing}:", *lines]) if lines else ""


def write_mixing(out_dir, rows, model_args, saved_at, mode):
    """layer_weights.json (shape of the original's file), .txt (its readable report) and .png;
    mode: model.MODES' row of model_args' residual_mode."""
    names = {"n_layer": "layers", "n_embd": "hidden size", "n_head": "attention heads",
             "mlp_hidden": "MLP (intermediate) size"}
    config = {k: model_args[k] for k in (*names, "residual_mode")}
    label = "Layer" if mode.row == "block" else mode.row
    atomic_write(os.path.join(out_dir, "layer_weights.json"),
                 json.dumps({"saved_at": saved_at, "config": config, "layers": rows}, indent=1))
    lines = [f"Learned residual mixing (residual_mode {config['residual_mode']}, {mode.name}): "
             f"{mode.mixing or 'none'}", f"Saved at: {saved_at}", "",
             "Model configuration:", *(f"  {name}: {config[k]}" for k, name in names.items()), ""]
    for r in rows:
        count = f"{r['count']} weight parameters" if r["count"] else "no weight parameters"
        lines.append(f"{label} {r['index']} (index {r['index']}): {count}")
        if r["count"]:
            lines += [f"  raw weights: {r['raw']}", f"  normalized weights: {r['normalized']}"]
    atomic_write(os.path.join(out_dir, "layer_weights.txt"), "\n".join(lines) + "\n")
    plt = pyplot("train.py", "no layer_weights.png") if any(r["count"] for r in rows) else None
    if plt is not None:
        n = len(rows)
        fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.55 * n), max(4.0, 1.0 + 0.5 * n)))
        draw_layer_heatmap(fig, ax, [r["normalized"] for r in rows], 2, mode,
                           f"residual_mode {mode.name}")
        save_figure(plt, fig, os.path.join(out_dir, "layer_weights.png"))


def pyplot(script, missing):
    """matplotlib's pyplot without a display, or None with a one-line notice: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"{script}: matplotlib is not installed, so {missing} (pip install matplotlib)",
              flush=True)
        return None


def save_figure(plt, fig, path):
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def draw_layer_heatmap(fig, ax, rows, digits, mode, title):
    """rows[r]: the weights of heatmap row r (block m, z_k in mode 6, sublayer k in modes 8 and 9),
    or None: drawn row by row, lower-triangular where each row reaches one further back, blank
    where a row has none. mode: model.MODES' row, which names the rows and columns."""
    rows = [[] if row is None else list(row) for row in rows]
    width = max([1, *map(len, rows)])
    grid = np.array([row + [np.nan] * (width - len(row)) for row in rows])  # nan stays blank
    image = ax.imshow(grid, cmap="viridis", vmin=min(0.0, np.nanmin(grid)))
    if grid.size <= 400:
        for r, i in zip(*np.nonzero(~np.isnan(grid))):
            ax.text(i, r, f"{grid[r, i]:.{digits}f}", ha="center", va="center", fontsize=7,
                    color="w")
    ylabel = {"block": "block m", "z": "sublayer input z_k", "sublayer": "sublayer k"}[mode.row]
    ax.set(xlabel=mode.column, ylabel=ylabel, xticks=range(width), yticks=range(len(rows)))
    ax.set_title(f"{mode.mixing}\n{title}", fontsize=9)
    fig.colorbar(image, ax=ax)


def peak_memory_bytes(device_type):
    """Peak memory of this process: allocated CUDA memory on a GPU, else peak resident memory."""
    if device_type == "cuda":
        import torch  # loaded already in any process that has a CUDA device
        return torch.cuda.max_memory_allocated()
    with contextlib.suppress(OSError):  # Linux: VmHWM is this process image's own peak; ru_maxrss
        with open("/proc/self/status") as f:  # also counts the parent's size when it forked us
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    with contextlib.suppress(ImportError):  # Windows has no resource module
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    return None
