"""
The residual-mode experiment end to end: every mode x several seeds on the same data and budget, then
paired statistics, plots and the learned layer weights.

    python compare.py configs/cpu.py --modes 0,1,2,3 --seeds 3                 # 12 runs, one after another
    python compare.py configs/cpu.py --seeds 3 --max_iters=300 --name quick    # --key=value goes to train.py
    python compare.py configs/cpu.py --seeds 3 --parallel 2                    # two at a time, one core each
    python compare.py configs/method0.py --seeds 3 --gpus 0,1,2,3              # one run per GPU at a time
    python compare.py configs/cpu.py --seeds 3 --dry-run                       # list the runs, train nothing

Run (mode M, seed S) is `train.py CONFIGS --key=value... --residual_mode=M --seed=S --out_dir=runs/NAME/modeM_seedS`:
everything but the mode and the seed is the same. train.py draws the init and the order of the training
windows from the seed alone, and scores every run on one fixed set of validation windows, so the runs of
one seed see the same batches in the same order whatever their mode: the per-seed differences are paired.
Rerunning the same command skips finished runs and resumes an interrupted one from its checkpoint.
Results: results/NAME/summary.md, summary.json and plots; the terminal prints the summary too.
"""
import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

import model as model_lib
import prepare
import train

RUNS_DIR = "runs"  # runs/NAME/modeM_seedS is each run's out_dir
RESULTS_DIR = "results"  # results/NAME/ gets the summaries and plots
CONFIDENCE = 0.95  # of the paired t-intervals
OPTIONS = {"modes", "seeds", "name", "baseline", "parallel", "gpus", "dry-run", "help"}  # the rest goes to train.py
SET_PER_RUN = {"residual_mode": "--modes", "seed": "--seeds", "out_dir": "--name",  # train.py keys compare.py sets
               "init_from": "nothing: resuming is automatic"}
# the original note: method 1 > method 0 > method 2, and method 3 at least as good as method 1. (better, worse, strict)
ORIGINAL_CLAIMS = [(1, 0, True), (0, 2, True), (3, 1, False)]
MODE_NAMES = {i: name for name, i in model_lib.RESIDUAL_MODES.items()}
TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


class CompareError(Exception):
    """Bad arguments or run folders: main() prints it as one line."""


# -----------------------------------------------------------------------------
# statistics

def mean_std(values):
    """-> (mean, sample standard deviation with n - 1); the std is None below two values."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def t_within(t, df):
    """P(|T| <= t) for Student's t with integer df, exactly: Abramowitz & Stegun 26.7.3 / 26.7.4, finite
    sums of powers of cos(theta), theta = atan(t / sqrt(df))."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, total = math.cos(theta) ** 2, 0.0
    if df % 2:  # odd: (2/pi) * (theta + sin cos * (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...)), df - 2 powers of cos in all
        term = 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * 2 * k / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term = 1.0  # even: sin * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...), up to cos^(df - 2)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(p, df):
    """The p-quantile of Student's t with integer df >= 1, by bisection on t_within (no scipy)."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    target, lo, hi = 2 * p - 1, 0.0, 1.0
    while t_within(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def paired_interval(a, b, confidence=CONFIDENCE):
    """a, b: {seed: value}. Per-seed differences a - b over the seeds both have, their mean and the
    t-interval of that mean; low/high are None below two pairs (one pair says nothing about the noise)."""
    seeds = sorted(set(a) & set(b))
    diffs = {s: a[s] - b[s] for s in seeds}
    mean, std = mean_std(list(diffs.values())) if diffs else (None, None)
    low = high = None
    if std is not None:
        half = t_quantile(0.5 + confidence / 2, len(diffs) - 1) * std / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
    return {"per_seed": diffs, "mean": mean, "std": std, "low": low, "high": high,
            "excludes_zero": None if low is None else (low > 0 or high < 0)}


# -----------------------------------------------------------------------------
# the runs

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error, instead of usage + error
        raise CompareError(f"{message} (train.py flags take the form --key=value; see python compare.py --help)")


def parse_args(argv):
    """-> (args, train flags). Our options are split from train.py's --key=value flags by name."""
    ours = [a for a in argv if not a.startswith("--") or a[2:].partition("=")[0] in OPTIONS]
    flags = [a for a in argv if a not in ours]
    parser = ArgumentParser(prog="compare.py", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                            epilog="Any other --key=value is a train.py config flag, applied to every run.")
    parser.add_argument("configs", nargs="+", help="train.py config files, e.g. configs/cpu.py")
    parser.add_argument("--modes", default="0,1,2,3", help="residual modes, numbers or names (default 0,1,2,3)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per mode (default 3)")
    parser.add_argument("--name", help="sweep name: runs/NAME and results/NAME (default: the config names)")
    parser.add_argument("--baseline", default="0", help="the mode the others are paired against (default 0)")
    parser.add_argument("--parallel", type=int, help="runs at a time (default 1); on CPU they split the cores")
    parser.add_argument("--gpus", help="GPU ids, one run on each at a time, e.g. 0,1 (repeat an id for two)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their configs, train nothing")
    args = parser.parse_args(ours)
    try:
        args.modes = sorted({model_lib.parse_residual_mode(m) for m in args.modes.split(",")})
        args.baseline = model_lib.parse_residual_mode(args.baseline)
    except ValueError as e:
        raise CompareError(e) from None
    if args.baseline not in args.modes:
        raise CompareError(f"--baseline {args.baseline} is not among --modes {args.modes}")
    if args.seeds < 1:
        raise CompareError("--seeds must be at least 1")
    if args.gpus is not None and args.parallel is not None:
        raise CompareError("give --gpus or --parallel, not both: --gpus runs one run per listed id at a time")
    args.gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
    args.parallel = len(args.gpus) or args.parallel or 1
    if args.parallel < 1:
        raise CompareError("--parallel must be at least 1")
    args.name = args.name or "_".join(os.path.splitext(os.path.basename(c))[0] for c in args.configs)
    for flag in flags:
        key = flag[2:].partition("=")[0]
        if key in SET_PER_RUN:
            raise CompareError(f"{flag}: compare.py sets {key} for each run; use {SET_PER_RUN[key]}")
    return args, flags


def plan_runs(args, flags):
    """Every (mode, seed), seed-major so a stopped sweep already has complete pairs, with its resolved config."""
    runs = []
    for seed in range(args.seeds):
        for mode in args.modes:
            name = f"mode{mode}_seed{seed}"
            out_dir = os.path.join(RUNS_DIR, args.name, name)
            argv = [*args.configs, *flags, f"--residual_mode={mode}", f"--seed={seed}", f"--out_dir={out_dir}"]
            try:
                config = train.load_config(argv)
                train.validate(config)
            except train.ConfigError as e:
                raise CompareError(e) from None
            runs.append({"mode": mode, "seed": seed, "name": name, "out_dir": out_dir, "argv": argv, "config": config})
    return runs


def run_state(run):
    """'done' (metrics.jsonl has its final record), 'resume' (a checkpoint to continue) or 'new'."""
    if any(r.get("type") == "done" for r in train.read_metrics(os.path.join(run["out_dir"], "metrics.jsonl"))):
        return "done"
    return "resume" if os.path.exists(os.path.join(run["out_dir"], "ckpt.pt")) else "new"


def check_settings(run):
    """A run folder remembers the config it was started with (compare.json): a rerun with other settings
    must not mix old and new runs in one comparison."""
    path = os.path.join(run["out_dir"], "compare.json")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(run["out_dir"], "metrics.jsonl")):
            raise CompareError(f"{run['out_dir']} holds a run that compare.py did not start; "
                               "delete it or choose another --name")
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise CompareError(f"cannot read {path} ({e}); delete {run['out_dir']} to redo that run") from None
    changed = [f"{k} {old.get(k)!r} then, {v!r} now" for k, v in run["config"].items() if old.get(k) != v]
    if changed:
        raise CompareError(f"{run['out_dir']} was started with other settings ({'; '.join(changed)}); rerun with "
                           f"those, choose another --name, or delete {os.path.dirname(run['out_dir'])}")


def lock_sweep(folder):
    """An exclusive lock on the sweep folder, inherited by every train.py it starts: a second compare.py on the
    same sweep stops at once, even while an orphaned train.py of a killed compare.py is still writing."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return None
    fd = os.open(os.path.join(folder, "sweep.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CompareError(f"another compare.py (or a train.py it started) is running the sweep in {folder}; "
                           "wait for it or stop it first") from None
    return fd


STOP = {"signal": 0}  # set by SIGINT / SIGTERM: every run is asked to checkpoint and stop


def request_stop(signum, frame):
    STOP["signal"] = STOP["signal"] or signum


def launch(run, state, gpu, parallel, lock_fd):
    train.atomic_write(os.path.join(run["out_dir"], "compare.json"),
                       lambda f: f.write(json.dumps(run["config"], indent=1).encode()))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    elif parallel > 1 and "OMP_NUM_THREADS" not in os.environ:  # CPU runs side by side share the cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, cores // parallel))
    argv = run["argv"] + (["--init_from=resume"] if state == "resume" else [])
    log = open(os.path.join(run["out_dir"], "train.log"), "a", encoding="utf-8")
    log.write(f"=== compare.py {time.strftime('%Y-%m-%d %H:%M:%S')}: python train.py {shlex.join(argv)}\n")
    log.flush()
    # a session of its own: Ctrl-C reaches compare.py only, which then asks each run to stop exactly once
    # (a second signal makes train.py quit without saving)
    proc = subprocess.Popen([sys.executable, TRAIN_PY, *argv], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, pass_fds=() if lock_fd is None else (lock_fd,))
    log.close()
    return proc


def last_line(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_sweep(runs, args, lock_fd):
    """Runs every unfinished run, args.parallel at a time; stops cleanly on a signal or a failed run."""
    todo = []
    for run in runs:
        state = run_state(run)
        if state == "done":
            print(f"{run['name']}: already done, skipped", flush=True)
        else:
            todo.append((run, state))
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    active, free_gpus, failed, forwarded, t0 = {}, list(args.gpus), None, False, time.perf_counter()
    while active or (todo and not STOP["signal"] and not failed):
        while todo and len(active) < args.parallel and not STOP["signal"] and not failed:
            run, state = todo.pop(0)
            gpu = free_gpus.pop(0) if free_gpus else None
            os.makedirs(run["out_dir"], exist_ok=True)
            active[launch(run, state, gpu, args.parallel, lock_fd)] = (run, gpu, time.perf_counter())
            print(f"{run['name']}: {'resuming from its checkpoint' if state == 'resume' else 'started'}"
                  f"{'' if gpu is None else f' on GPU {gpu}'}, log in {run['out_dir']}/train.log", flush=True)
        if (STOP["signal"] or failed) and not forwarded:
            for proc in active:
                proc.send_signal(signal.SIGTERM)  # train.py checkpoints and exits
            forwarded = True
        time.sleep(0.1)
        for proc in [p for p in active if p.poll() is not None]:
            run, gpu, started = active.pop(proc)
            if gpu is not None:
                free_gpus.append(gpu)
            log = os.path.join(run["out_dir"], "train.log")
            if run_state(run) == "done":
                loss = next(r for r in train.read_metrics(os.path.join(run["out_dir"], "metrics.jsonl"))
                            if r.get("type") == "done")["eval_loss"]
                print(f"{run['name']}: done in {train.hms(time.perf_counter() - started)}, eval_loss {loss:.4f}", flush=True)
            elif forwarded:
                kept = os.path.exists(os.path.join(run["out_dir"], "ckpt.pt"))
                print(f"{run['name']}: stopped; " + ("its checkpoint is kept" if kept else "it starts over next time"), flush=True)
            else:
                failed = f"run {run['name']} failed (exit {proc.returncode}): {last_line(log)} (full log: {log})"
    for s, handler in previous.items():
        signal.signal(s, handler)
    if failed:
        raise CompareError(failed)
    if STOP["signal"]:
        finished = sum(run_state(r) == "done" for r in runs)
        raise CompareError(f"stopped by {signal.Signals(STOP['signal']).name}: {finished} of {len(runs)} runs are "
                           "finished; rerun the same command to continue (finished runs are skipped, stopped ones resume)")
    print(f"all {len(runs)} runs finished ({train.hms(time.perf_counter() - t0)} this time)", flush=True)


# -----------------------------------------------------------------------------
# results

def load_run(run):
    """What the summary needs from a finished run folder."""
    try:
        records = train.read_metrics(os.path.join(run["out_dir"], "metrics.jsonl"))
        done = [r for r in records if r.get("type") == "done"][-1]
        evals = {r["iter"]: r for r in records if r.get("type") == "eval"}  # by iter: a resume never repeats one
        speeds = [r["tokens_per_sec"] for r in records if r.get("type") == "train"]
        with open(os.path.join(run["out_dir"], "layer_weights.json"), encoding="utf-8") as f:
            layers = json.load(f)["layers"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise CompareError(f"cannot read the results in {run['out_dir']} ({type(e).__name__}: {e}); "
                           "delete that folder and rerun to redo the run") from None
    weights = [layer["normalized"] for layer in layers] if any(layer["count"] for layer in layers) else None
    return {"mode": run["mode"], "seed": run["seed"], "out_dir": run["out_dir"], "iter": done["iter"],
            "tokens": done["tokens"], **{k: done[k] for k in ("eval_loss", "eval_perplexity", "eval_accuracy")},
            # the median of the logged rates, skipping the first: it carries the warm-up
            "tokens_per_sec": statistics.median(speeds[1:] or speeds) if speeds else None,
            "peak_memory_bytes": done.get("peak_memory_bytes"), "elapsed": done["elapsed"],
            "curve": [(evals[i]["tokens"], evals[i]["eval_loss"]) for i in sorted(evals)], "layer_weights": weights}


def summarize(results, args, command):
    """results: load_run() of every run -> the summary as one JSON-able dict."""
    modes = {}
    for mode in args.modes:
        rs = [r for r in results if r["mode"] == mode]
        entry = {"name": MODE_NAMES[mode], "seeds": [r["seed"] for r in rs]}
        for key in ("eval_loss", "eval_perplexity", "eval_accuracy"):
            mean, std = mean_std([r[key] for r in rs])
            entry[key] = {"mean": mean, "std": std, "per_seed": {r["seed"]: r[key] for r in rs}}
        speeds = [r["tokens_per_sec"] for r in rs if r["tokens_per_sec"] is not None]
        entry["tokens_per_sec"] = sum(speeds) / len(speeds) if speeds else None
        memory = [r["peak_memory_bytes"] for r in rs if r["peak_memory_bytes"] is not None]
        entry["peak_memory_bytes"] = max(memory) if memory else None
        grids = [r["layer_weights"] for r in rs if r["layer_weights"] is not None]
        if grids:  # rows of different lengths (block m has m + 1 weights): average row by row
            rows = [None if row is None else np.array([g[m] for g in grids]) for m, row in enumerate(grids[0])]
            entry["layer_weights"] = {"mean": [None if a is None else a.mean(0).tolist() for a in rows],
                                      "std": [None if a is None else (a.std(0, ddof=1).tolist() if len(grids) > 1 else None)
                                              for a in rows], "seeds": len(grids)}
        modes[mode] = entry
    loss = {m: modes[m]["eval_loss"]["per_seed"] for m in modes}
    paired = {m: paired_interval(loss[m], loss[args.baseline]) for m in args.modes if m != args.baseline}
    ranking = sorted(args.modes, key=lambda m: modes[m]["eval_loss"]["mean"])
    claims = None
    if all(m in modes for m in (0, 1, 2, 3)):
        claims = []
        for better, worse, strict in ORIGINAL_CLAIMS:
            diff = paired_interval(loss[better], loss[worse])
            holds = diff["mean"] < 0 if strict else diff["mean"] <= 0
            claims.append({"claim": f"{better} {'>' if strict else '≥'} {worse}", **diff, "holds": holds})
    budgets = sorted({(r["iter"], r["tokens"]) for r in results})
    return {"name": args.name, "command": command, "modes": modes, "baseline": args.baseline, "paired": paired,
            "ranking": ranking, "original_claims": claims, "confidence": CONFIDENCE, "parallel": args.parallel,
            "budgets": budgets, "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results]}


def fmt(stat, digits=4):
    return f"{stat['mean']:.{digits}f}" + ("" if stat["std"] is None else f" ± {stat['std']:.{digits}f}")


def fmt_interval(d):
    return "n/a: one seed" if d["low"] is None else f"[{d['low']:+.4f}, {d['high']:+.4f}]"


def summary_markdown(s):
    pct, base = f"{100 * s['confidence']:.0f}%", s["baseline"]
    budget = "; ".join(f"{it:,} iters = {tok:,} tokens" for it, tok in s["budgets"])
    lines = [f"# Residual modes: {s['name']}", "", f"`{s['command']}`", "",
             f"Every run: {budget}{'' if len(s['budgets']) == 1 else ' (WARNING: the runs differ in budget)'}; "
             "the same validation windows. Final eval loss (nats/token) as mean ± std over seeds.", "",
             "| mode | name | seeds | eval loss | perplexity | accuracy | tokens/s | peak memory |", "|---" * 8 + "|"]
    for m, e in s["modes"].items():
        speed = "n/a" if e["tokens_per_sec"] is None else f"{e['tokens_per_sec']:,.0f}"
        memory = "n/a" if e["peak_memory_bytes"] is None else f"{e['peak_memory_bytes'] / 2**20:,.0f} MiB"
        lines.append(f"| {m} | {e['name']} | {len(e['seeds'])} | {fmt(e['eval_loss'])} | {fmt(e['eval_perplexity'], 2)} "
                     f"| {fmt(e['eval_accuracy'])} | {speed} | {memory} |")
    seeds = sorted({seed for e in s["modes"].values() for seed in e["seeds"]})
    lines += ["", f"Final eval loss minus that of mode {base} ({MODE_NAMES[base]}) with the same seed, i.e. the same "
              "initial weights and batches (negative: better than the baseline):", "",
              "| mode | " + " | ".join(f"seed {x}" for x in seeds) + f" | mean | {pct} t-interval | excludes 0 |",
              "|---" * (len(seeds) + 4) + "|"]
    for m, d in s["paired"].items():
        cells = [f"{d['per_seed'][x]:+.4f}" if x in d["per_seed"] else "" for x in seeds]
        verdict = {None: "n/a", False: "no"}.get(d["excludes_zero"], "yes: lower" if d["mean"] < 0 else "yes: higher")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {d['mean']:+.4f} | {fmt_interval(d)} | {verdict} |")
    lines += ["", "Ranking by mean final eval loss, best first: "
              + " > ".join(f"{m} ({MODE_NAMES[m]})" for m in s["ranking"])]
    claims = s["original_claims"]
    if claims is None:
        lines.append("Original ranking (1 > 0 > 2, 3 ≥ 1): not checked; it needs modes 0, 1, 2 and 3.")
    else:
        held, clear = all(c["holds"] for c in claims), sum(bool(c["excludes_zero"]) for c in claims)
        lines.append(f"Original ranking (1 > 0 > 2, 3 ≥ 1): **{'held' if held else 'did not hold'}** at this scale on "
                     f"the mean losses; {clear} of its {len(claims)} comparisons lie outside the seed noise:")
        for c in claims:
            noise = {None: "no interval from one seed", True: "outside the seed noise"}.get(
                c["excludes_zero"], "within the seed noise (the interval includes 0)")
            lines.append(f"- {c['claim']}: loss difference {c['mean']:+.4f}, {pct} t-interval {fmt_interval(c)}: "
                         f"{'holds' if c['holds'] else 'fails'}, {noise}")
    for m, e in s["modes"].items():
        if "layer_weights" in e:
            w = e["layer_weights"]
            spread = max((x for row in w["std"] if row is not None for x in row), default=None)
            lines += ["", f"Learned weights of mode {m} ({e['name']}), softmax(theta_m) over blocks 0..m, mean over "
                      f"{w['seeds']} seed(s)" + ("" if spread is None else f"; the largest std over seeds is {spread:.3f}")
                      + ":", "```"]
            lines += [f"block {i:>2}: " + " ".join(f"{v:.3f}" for v in row)
                      for i, row in enumerate(w["mean"]) if row is not None]
            lines.append("```")
    if s["parallel"] > 1:
        lines += ["", f"Runs went {s['parallel']} at a time, so tokens/s and peak memory were measured side by side."]
    return "\n".join(lines) + "\n"


def write_results(summary, results, folder):
    os.makedirs(folder, exist_ok=True)
    text = summary_markdown(summary)
    train.atomic_write(os.path.join(folder, "summary.md"), lambda f: f.write(text.encode()))
    train.atomic_write(os.path.join(folder, "summary.json"), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    print(text, end="", flush=True)
    plot_results(summary, results, folder)
    print(f"wrote {folder}/summary.md, summary.json and plots", flush=True)


def get_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("compare.py: matplotlib is not installed, so no plots (pip install matplotlib)", flush=True)
        return None


def save_figure(plt, fig, path):
    fig.tight_layout()
    train.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def plot_results(summary, results, folder):
    plt = get_pyplot()
    if plt is None:
        return
    colors = {m: f"C{i}" for i, m in enumerate(summary["modes"])}
    # val loss against tokens: the mean over seeds, and a band from the lowest to the highest seed
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in summary["modes"]:
        curves = [dict(r["curve"]) for r in results if r["mode"] == m]
        tokens = sorted(set.intersection(*(set(c) for c in curves)))
        if len(tokens) > 2:
            tokens = tokens[1:]  # the untrained model's loss would squash the scale
        losses = np.array([[c[t] for t in tokens] for c in curves])  # (seeds, evals)
        ax.plot(tokens, losses.mean(0), color=colors[m], label=f"{m} {MODE_NAMES[m]}")
        ax.fill_between(tokens, losses.min(0), losses.max(0), color=colors[m], alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("val loss: mean over seeds, band from min to max")
    ax.legend()
    save_figure(plt, fig, os.path.join(folder, "val_loss.png"))
    # quality against throughput: one dot per run, the mode mean as a cross
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, e in summary["modes"].items():
        rs = [r for r in results if r["mode"] == m and r["tokens_per_sec"] is not None]
        if not rs:
            continue
        ax.scatter([r["tokens_per_sec"] for r in rs], [r["eval_loss"] for r in rs], color=colors[m], alpha=0.4, s=18)
        ax.scatter([e["tokens_per_sec"]], [e["eval_loss"]["mean"]], color=colors[m], marker="X", s=90,
                   label=f"{m} {MODE_NAMES[m]}")
    ax.set_xlabel("training tokens/s (median per run)")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.set_title("quality against throughput (down and right is better)")
    ax.legend()
    save_figure(plt, fig, os.path.join(folder, "quality_vs_throughput.png"))
    for m, e in summary["modes"].items():
        if "layer_weights" in e:
            plot_layer_weights(plt, e["layer_weights"], m, os.path.join(folder, f"layer_weights_mode{m}.png"))


def plot_layer_weights(plt, w, mode, path):
    """Lower-triangular heatmaps of the mean weights over seeds and, beside it, their std over seeds."""
    n = len(w["mean"])
    panels = [("mean", w["mean"], 2)] + ([("std over seeds", w["std"], 3)] if w["seeds"] > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.2 + 0.55 * n), 0.8 + 0.5 * n), squeeze=False)
    for ax, (title, rows, digits) in zip(axes[0], panels):
        train.draw_layer_heatmap(fig, ax, rows, digits, f"mode {mode}: {title} ({w['seeds']} seeds)")
    save_figure(plt, fig, path)


# -----------------------------------------------------------------------------

def dry_run(runs, args):
    shared = {k: v for k, v in runs[0]["config"].items() if k not in SET_PER_RUN}
    print(f"compare.py: {len(runs)} runs ({len(args.modes)} modes x {args.seeds} seeds) in {RUNS_DIR}/{args.name}, "
          f"{args.parallel} at a time; results in {RESULTS_DIR}/{args.name}")
    print(f"the config every run shares ({' '.join(args.configs)} and flags, resolved):")
    for k, v in shared.items():
        print(f"  {k} = {v!r}")
    print("the runs, which differ only in these (and their state: new, resume or done):")
    for run in runs:
        print(f"  residual_mode = {run['mode']} ({MODE_NAMES[run['mode']]}), seed = {run['seed']}, "
              f"out_dir = {run['out_dir']}: {run_state(run)}")
    print(f"each: python train.py {shlex.join(runs[0]['argv'][:-3])} --residual_mode=M --seed=S --out_dir=...")


def main(argv):
    args, flags = parse_args(argv)
    runs = plan_runs(args, flags)
    for run in runs:
        check_settings(run)
    if args.dry_run:
        dry_run(runs, args)
        return
    folder = os.path.join(RUNS_DIR, args.name)
    os.makedirs(folder, exist_ok=True)
    lock_fd = lock_sweep(folder)
    try:  # a built-in corpus is prepared here, once: runs side by side would each try, and all but one fail
        train.open_dataset(runs[0]["config"], master=True, ddp=False)
    except prepare.DataError as e:
        raise CompareError(e) from None
    run_sweep(runs, args, lock_fd)
    results = [load_run(run) for run in runs]
    summary = summarize(results, args, shlex.join(["python", "compare.py", *argv]))
    write_results(summary, results, os.path.join(RESULTS_DIR, args.name))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CompareError as e:
        sys.exit(f"compare.py: {e}")
