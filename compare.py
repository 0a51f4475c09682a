"""
The residual-mode experiment end to end: every mode x several seeds on the same data and budget,
then paired statistics, plots and the learned layer weights.

    python compare.py configs/cpu.py --modes 0,1,2,3 --seeds 3 --parallel 2  # 12 runs, 2 at a time
    python compare.py configs/cpu.py --seeds 3 --max_iters=300 --name quick  # flags: for train.py

Run (mode M, seed S) is train.py with --residual_mode=M --seed=S --out_dir=runs/NAME/modeM_seedS.
train.py draws the init and the order of the training windows from the seed alone, so the runs of
one seed see the same batches whatever their mode: the per-seed differences are paired, and tested
with Holm's correction for the several comparisons. A rerun skips finished runs, resumes the rest.
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

import model as model_lib
import prepare
from harness import configurator, report, shards

RUNS_DIR = "runs"  # runs/NAME/modeM_seedS is each run's out_dir
RESULTS_DIR = "results"  # results/NAME/ gets the summaries and plots
CONFIDENCE = 0.95  # of the paired t-intervals; Holm's correction keeps 1 - CONFIDENCE per family
POWER = 0.8  # of the smallest detectable difference: the one a paired t-test finds 80% of the time
NOTE_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs",
                            "note_method3_layer_weights.json")  # the original note's mode 3
SET_PER_RUN = {"residual_mode": "--modes", "seed": "--seeds", "out_dir": "--name",  # set per run
               "init_from": "nothing: resuming is automatic"}
# the original note: method 1 > method 0 > method 2, and method 3 at least as good as method 1
ORIGINAL_CLAIMS = [(1, 0, True), (0, 2, True), (3, 1, False)]  # (better, worse, strict)
TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
SCORES = ("eval_loss", "eval_perplexity", "eval_accuracy")  # a run's final scores
# sweep keys that change the corpus, the eval set or the length of training: raw losses at two of
# their values measure different things, so only the paired effects are compared across them
INCOMPARABLE = ("dataset", "data_dir", "block_size", "eval_iters", "max_iters", "max_epochs")


class CompareError(Exception):
    """Bad arguments or run folders: main() prints it as one line."""


def mean_std(values):
    """-> (mean, sample standard deviation with n - 1); the std is None below two values."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def t_within(t, df):
    """P(|T| <= t) for Student's t with integer df, exactly (Abramowitz & Stegun 26.7.3/4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, odd, term, total = math.cos(theta) ** 2, df % 2, 1.0, 0.0
    # sums to c^(df-2), c = cos(theta): odd df 1 + 2/3 c^2 + 2*4/(3*5) c^4 ..., even 1 + 1/2 c^2 ...
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1 + odd) / (2 * k + odd)
    if odd:
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    return math.sin(theta) * total


def t_quantile(p, df):
    """The p-quantile of Student's t, by bisection over theta = atan(t / sqrt(df)) in [0, pi/2)."""
    if p < 0.5:
        return -t_quantile(1 - p, df)
    target, lo, hi = 2 * p - 1, 0.0, math.pi / 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(math.sqrt(df) * math.tan(mid), df) < target else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def paired_interval(a, b):
    """a, b: {seed: value} -> the differences a - b over the seeds both have, their mean, its
    t-interval and the paired t-test's p; no interval or p below two pairs (no noise estimate)."""
    diffs = {s: a[s] - b[s] for s in sorted(set(a) & set(b))}
    mean, std = mean_std(list(diffs.values()))
    d = {"per_seed": diffs, "mean": mean, "std": std}
    if std is None:
        return {**d, **dict.fromkeys(("low", "high", "excludes_zero", "p", "detectable"))}
    return {**d, **interval(d, CONFIDENCE), "p": p_value(d),
            "detectable": detectable(std, len(diffs))}


def detectable(std, n):
    """The smallest true mean difference that n pairs with this paired std detect (two-sided, at
    1 - CONFIDENCE) with probability POWER: (t_(1-alpha/2) + t_power) * std / sqrt(n), df n - 1.
    The usual approximation: by simulation its power is 0.79 at 5 seeds, 0.77 at 3."""
    df = n - 1
    return (t_quantile(0.5 + CONFIDENCE / 2, df) + t_quantile(POWER, df)) * std / math.sqrt(n)


def interval(d, confidence):
    """The t-interval of d's mean difference at this confidence, and whether it excludes 0."""
    mean, n = d["mean"], len(d["per_seed"])
    half = t_quantile(0.5 + confidence / 2, n - 1) * d["std"] / math.sqrt(n)
    return {"low": mean - half, "high": mean + half, "excludes_zero": abs(mean) > half}


def p_value(d):
    """Two-sided p of the paired t-test (two pairs or more) that the mean difference is 0."""
    if d["std"] == 0:  # every seed agrees exactly
        return 1.0 if d["mean"] == 0 else 0.0
    n = len(d["per_seed"])
    return max(0.0, 1 - t_within(d["mean"] / d["std"] * math.sqrt(n), n - 1))


def holm(pvalues, alpha=1 - CONFIDENCE):
    """Holm's step-down over one family of k raw p-values -> (adjusted p-values, confidence of each
    adjusted interval), in the given order. Rank j's confidence is 1 - alpha / (k - min(j, j*) + 1),
    j* the first rank not rejected: an adjusted interval excludes 0 exactly when p_adj < alpha."""
    k, running, stop = len(pvalues), 0.0, None
    adjusted, confidence = [None] * k, [None] * k
    for j, i in enumerate(sorted(range(k), key=lambda i: pvalues[i]), 1):
        running = max(running, min(1.0, (k - j + 1) * pvalues[i]))
        if stop is None and running >= alpha:
            stop = j
        adjusted[i], confidence[i] = running, 1 - alpha / (k - min(j, stop or j) + 1)
    return adjusted, confidence


def adjust_family(comparisons):
    """Gives each paired_interval() dict of one family its Holm-adjusted p and interval, "holm"."""
    tested = [d for d in comparisons if d["p"] is not None]
    for d in comparisons:
        d["holm"] = dict.fromkeys(("p", "confidence", "low", "high", "excludes_zero"))
    for d, p, confidence in zip(tested, *holm([d["p"] for d in tested])):
        d["holm"] = {"p": p, "confidence": confidence, **interval(d, confidence)}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error, instead of usage + error
        raise CompareError(f"{message} (see python compare.py --help)")


def parse_args(argv):
    """-> (args, train.py flags): every --key=value that is not one of our options."""
    parser = ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0],
                            allow_abbrev=False, epilog="Other --key=value flags go to train.py.")
    add = parser.add_argument
    add("configs", nargs="+", help="train.py config files, e.g. configs/cpu.py")
    add("--modes", default="0,1,2,3", help="residual modes, numbers or names (default 0,1,2,3)")
    add("--seeds", type=int, default=3, help="seeds 0..N-1 per mode (default 3)")
    add("--name", help="sweep name: runs/NAME and results/NAME (default: the config names)")
    add("--baseline", help="the mode the others are paired against (default: the lowest mode)")
    add("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
        help="every mode and seed at each value of a train.py config key (repeat for a grid; "
        "K1/K2=V1/W1,V2/W2 moves two keys together)")
    either = parser.add_mutually_exclusive_group().add_argument
    either("--parallel", type=int, help="runs at a time (default 1); on CPU they split the cores")
    either("--gpus", help="GPU ids, one run on each at a time, e.g. 0,1 (repeat an id for two)")
    add("--dry-run", action="store_true", help="list the runs and their configs, train nothing")
    args, flags = parser.parse_known_args(argv)
    try:
        args.modes = sorted({model_lib.parse_residual_mode(m) for m in args.modes.split(",")})
        args.baseline = model_lib.parse_residual_mode(args.baseline or str(args.modes[0]))
    except ValueError as e:
        raise CompareError(e) from None
    if args.baseline not in args.modes:
        raise CompareError(f"--baseline {args.baseline} is not among --modes {args.modes}")
    if args.seeds < 1 or (args.parallel is not None and args.parallel < 1):
        raise CompareError("--seeds and --parallel must be at least 1")
    args.gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
    args.parallel = len(args.gpus) or args.parallel or 1
    args.name = args.name or "_".join(os.path.basename(c).rsplit(".", 1)[0] for c in args.configs)
    flag_keys = [flag[2:].partition("=")[0] for flag in flags]
    for key in flag_keys:
        if key in SET_PER_RUN:
            raise CompareError(f"--{key}: compare.py sets {key} per run; use {SET_PER_RUN[key]}")
    args.grid = [{}]  # one {key: value text} per point of the sweep's grid
    for spec in args.sweep:  # KEY=V1,V2 or, for keys that move together, K1/K2=V1/W1,V2/W2
        keys, _, values = spec.partition("=")
        keys, points = keys.split("/"), [v.split("/") for v in values.split(",") if v]
        for key in keys:
            try:
                configurator.check_key(key, f"--sweep {spec}", configurator.defaults(TRAIN_PY),
                                       "train.py")
            except configurator.ConfigError as e:
                raise CompareError(e) from None
        if ({*keys} & {*SET_PER_RUN, *flag_keys, *args.grid[0]} or not points
                or any(len(p) != len(keys) for p in points)):
            raise CompareError(f"--sweep {spec}: give a config key that is not set otherwise, "
                               "and its values (one per key), e.g. --sweep mixing_lr_mult=1,10,30 "
                               "or --sweep learning_rate/min_lr=1e-3/1e-4,4e-3/4e-4")
        args.grid = [{**point, **dict(zip(keys, p))} for point in args.grid for p in points]
    return args, flags


def value_name(point):
    """A grid point -> its name, also its runs' folder: "mixing_lr_mult=10" ("" without --sweep)."""
    return ",".join(f"{k}={v}" for k, v in point.items())


def plan_runs(args, flags):
    """Every (value, mode, seed) and its resolved config, seed-major: a stopped sweep has whole
    pairs. Runs at one value share the seed's initial weights and batches, as without --sweep."""
    runs, defaults = [], configurator.defaults(TRAIN_PY)
    for seed in range(args.seeds):
        for point in args.grid:
            for mode in args.modes:
                name = os.path.join(value_name(point), f"mode{mode}_seed{seed}")
                out_dir = os.path.join(RUNS_DIR, args.name, name)
                argv = [*args.configs, *flags, *(f"--{k}={v}" for k, v in point.items()),
                        f"--residual_mode={mode}", f"--seed={seed}", f"--out_dir={out_dir}"]
                config = configurator.load(argv, defaults, "train.py",
                                           {"residual_mode": model_lib.parse_residual_mode})
                configurator.check_train(config)
                configurator.model_args(config, model_lib.GPTConfig)  # the model's own checks
                runs.append({"mode": mode, "seed": seed, "value": value_name(point), "name": name,
                             "out_dir": out_dir, "argv": argv, "config": config})
    return runs


def run_state(run):
    """'done', 'resume' (from its checkpoint) or 'new'. A folder that compare.py did not start, or
    started with other settings (its compare.json), is refused rather than mixed into the sweep. A
    key added to train.py since the run started had its default then."""
    out, path = run["out_dir"], os.path.join(run["out_dir"], "compare.json")
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if old is None and os.path.exists(os.path.join(out, "metrics.jsonl")):
        raise CompareError(f"{out} holds a run without a readable compare.json, so not one that "
                           "compare.py started: delete it or choose another --name")
    old = None if old is None else {**configurator.defaults(TRAIN_PY), **old}
    changed = [f"{k} {old.get(k)!r} then, {v!r} now" for k, v in run["config"].items()
               if old is not None and old.get(k) != v]
    if changed:
        raise CompareError(f"{out} was started with other settings ({'; '.join(changed)}); rerun "
                           f"with those, choose another --name, or delete {os.path.dirname(out)}")
    if done_record(run) is not None:
        return "done"
    return "resume" if os.path.exists(os.path.join(out, "ckpt.pt")) else "new"


def done_record(run):
    records = report.read_metrics(os.path.join(run["out_dir"], "metrics.jsonl"))
    return next((r for r in reversed(records) if r.get("type") == "done"), None)


def lock_sweep(folder):
    """An exclusive lock on the sweep folder, inherited by every train.py it starts: a second
    compare.py on it stops at once, even while a killed compare.py's train.py still writes."""
    os.makedirs(folder, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return ()
    fd = os.open(os.path.join(folder, "sweep.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CompareError(f"another compare.py (or a train.py it started) is running the sweep "
                           f"in {folder}; wait for it or stop it first") from None
    return (fd,)  # to pass to every train.py


def launch(run, gpu, parallel, lock_fds):
    state = run_state(run)
    os.makedirs(run["out_dir"], exist_ok=True)
    report.atomic_write(os.path.join(run["out_dir"], "compare.json"), json.dumps(run["config"]))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    elif parallel > 1 and "OMP_NUM_THREADS" not in os.environ:  # CPU runs side by side share cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, (cores or 1) // parallel))
    argv = run["argv"] + (["--init_from=resume"] if state == "resume" else [])
    with open(os.path.join(run["out_dir"], "train.log"), "a", encoding="utf-8") as log:
        print(f"=== compare.py {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              f"python train.py {shlex.join(argv)}", file=log, flush=True)
        # a session of its own: Ctrl-C reaches compare.py only, which then asks each run to stop
        # exactly once (a second signal makes train.py quit without saving)
        proc = subprocess.Popen([sys.executable, TRAIN_PY, *argv], env=env, pass_fds=lock_fds,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"{run['name']}: " + ("resuming from its checkpoint" if state == "resume" else "started")
          + ("" if gpu is None else f" on GPU {gpu}") + f", log in {run['out_dir']}/train.log")
    return proc


def run_sweep(runs, args, lock_fds):
    """Runs the unfinished runs; a signal or a failed run asks each running one, once, to stop."""
    todo = [run for run in runs if run_state(run) != "done"]
    for run in (r for r in runs if r not in todo):
        print(f"{run['name']}: already done, skipped")
    free = list(args.gpus) or [None] * args.parallel  # a slot per run at a time: its GPU or None
    stop, active, forwarded, t0 = {}, {}, False, time.perf_counter()  # stop: signal, failed
    previous = {s: signal.signal(s, lambda signum, _: stop.setdefault("signal", signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    while active or (todo and not stop):
        while todo and free and not stop:
            run, gpu = todo.pop(0), free.pop(0)
            active[launch(run, gpu, args.parallel, lock_fds)] = run, gpu, time.perf_counter()
        if stop and not forwarded:
            for proc in active:
                proc.send_signal(signal.SIGTERM)  # train.py checkpoints and exits
            forwarded = True
        time.sleep(0.1)
        for proc in [p for p in active if p.poll() is not None]:
            run, gpu, started = active.pop(proc)
            free.append(gpu)
            done, log = done_record(run), os.path.join(run["out_dir"], "train.log")
            if done is not None:
                print(f"{run['name']}: done in {report.hms(time.perf_counter() - started)}, "
                      f"eval_loss {done['eval_loss']:.4f}")
            elif forwarded:
                print(f"{run['name']}: stopped, " + ("its checkpoint is kept"
                      if run_state(run) == "resume" else "it starts over next time"))
            else:
                with open(log, encoding="utf-8", errors="replace") as f:
                    last = [line.strip() for line in f if line.strip()][-1:] or ["(no output)"]
                stop["failed"] = (f"run {run['name']} failed (exit {proc.returncode}): {last[0]} "
                                  f"(full log: {log})")
    for s, handler in previous.items():
        signal.signal(s, handler)
    if "failed" in stop:
        raise CompareError(stop["failed"])
    if stop:
        finished = sum(run_state(r) == "done" for r in runs)
        raise CompareError(f"stopped by {signal.Signals(stop['signal']).name}: {finished} of "
                           f"{len(runs)} runs are finished; rerun the same command to continue "
                           "(finished runs are skipped, stopped ones resume)")
    print(f"all {len(runs)} runs finished ({report.hms(time.perf_counter() - t0)} this time)")


def load_run(run):
    try:
        records = report.read_metrics(os.path.join(run["out_dir"], "metrics.jsonl"))
        done = [r for r in records if r.get("type") == "done"][-1]
        evals = {r["iter"]: r for r in records if r.get("type") == "eval"}  # a resume repeats none
        speeds = [r["tokens_per_sec"] for r in records if r.get("type") == "train"]
        with open(os.path.join(run["out_dir"], "layer_weights.json"), encoding="utf-8") as f:
            layers = json.load(f)["layers"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise CompareError(f"cannot read the results in {run['out_dir']} ({type(e).__name__}: {e})"
                           "; delete that folder and rerun to redo the run") from None
    return {**{k: run[k] for k in ("mode", "seed", "value", "out_dir")},
            **{k: done[k] for k in ("iter", "tokens", *SCORES)},
            # the median of the logged rates, skipping the first: it carries the warm-up
            "tokens_per_sec": statistics.median(speeds[1:] or speeds) if speeds else None,
            "peak_memory_bytes": done.get("peak_memory_bytes"), "elapsed": done["elapsed"],
            "curve": [(evals[i]["tokens"], evals[i]["eval_loss"]) for i in sorted(evals)],
            "layer_weights": [layer["normalized"] for layer in layers]
            if any(layer["count"] for layer in layers) else None}


def read_note_weights():
    """The original note's learned mode-3 weights, block by block (None: block 0 has none)."""
    with open(NOTE_WEIGHTS, encoding="utf-8") as f:
        return [layer["normalized"] for layer in json.load(f)["layers"]]


def correlation(a, b):
    """Pearson's r of two rows of weights; None for a missing, short (< 3) or flat row."""
    try:
        return statistics.correlation(a, b) if a and b and len(a) > 2 else None
    except statistics.StatisticsError:  # a row with every weight equal
        return None


def summarize(results, args, command):
    """One block of the summary: the runs of one value (all of them without --sweep)."""
    modes = {}
    for mode in args.modes:
        rs = [r for r in results if r["mode"] == mode]
        entry = modes[mode] = {"name": model_lib.MODES[mode].name, "seeds": [r["seed"] for r in rs]}
        for key in SCORES:
            mean, std = mean_std([r[key] for r in rs])
            entry[key] = {"mean": mean, "std": std, "per_seed": {r["seed"]: r[key] for r in rs}}
        for key, combine in (("tokens_per_sec", statistics.fmean), ("peak_memory_bytes", max)):
            values = [r[key] for r in rs if r[key] is not None]  # memory: the largest over seeds
            entry[key] = combine(values) if values else None
        grids = [r["layer_weights"] for r in rs if r["layer_weights"] is not None]
        if grids:  # block m's weights over blocks 0..m (None: it has none), over seeds
            blocks = [None if ws[0] is None else [mean_std(x) for x in zip(*ws)]
                      for ws in zip(*grids)]
            mean = [None if b is None else [mu for mu, _ in b] for b in blocks]
            std = [None if b is None or len(grids) < 2 else [sd for _, sd in b] for b in blocks]
            entry["layer_weights"] = {"mean": mean, "std": std, "seeds": len(grids)}
            note = read_note_weights() if mode == 3 else []
            if len(note) == len(mean):  # the note's mode at the note's depth: compare the patterns
                entry["note_correlation"] = [correlation(a, b) for a, b in zip(mean, note)]
    loss = {m: modes[m]["eval_loss"]["per_seed"] for m in modes}
    paired = {m: paired_interval(loss[m], loss[args.baseline]) for m in args.modes
              if m != args.baseline}  # one family: the modes against the baseline
    adjust_family(list(paired.values()))
    claims = []  # a second family, where modes 0-3 all ran: the original note's comparisons
    for better, worse, strict in ORIGINAL_CLAIMS if {0, 1, 2, 3} <= set(modes) else []:
        d = paired_interval(loss[better], loss[worse])
        claims.append({"claim": f"{better} {'>' if strict else '≥'} {worse}", **d,
                       "holds": d["mean"] < 0 if strict else d["mean"] <= 0})
    adjust_family(claims)
    return {"name": args.name, "command": command, "modes": modes, "baseline": args.baseline,
            "paired": paired, "ranking": sorted(modes, key=lambda m: modes[m]["eval_loss"]["mean"]),
            "original_claims": claims, "confidence": CONFIDENCE, "parallel": args.parallel,
            "budgets": sorted({(r["iter"], r["tokens"]) for r in results}), "correction": "holm",
            "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results]}


def across_values(blocks):
    """Each value's final losses minus the first value's, mode by mode, paired by seed: a family."""
    first, *others = blocks
    family = {f"{m}: {name} − {first}": paired_interval(blocks[name]["modes"][m]["eval_loss"]
                                                        ["per_seed"], e["eval_loss"]["per_seed"])
              for m, e in blocks[first]["modes"].items() for name in others}
    adjust_family(list(family.values()))
    return family


def effect_by_value(blocks):
    """-> ({mode: {value: its paired difference to the baseline}}, the interaction family). The
    effects are each value's own (Holm over its modes, as in its block). The interaction: for each
    mode and each later value v, (mode - baseline at v) - (mode - baseline at the first value),
    paired by seed, with Holm's correction over all of those rows: does the effect change?"""
    first, *others = blocks
    effect = {m: {v: block["paired"][m] for v, block in blocks.items()}
              for m in blocks[first]["paired"]}
    interaction = {f"{m}: {v} − {first}": paired_interval(by_value[v]["per_seed"],
                                                         by_value[first]["per_seed"])
                   for m, by_value in effect.items() for v in others}
    adjust_family(list(interaction.values()))
    return effect, interaction


def fmt(stat, digits=4):
    std = "" if stat["std"] is None else f" ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{std}"


def fmt_interval(d):
    """A Holm interval shows its confidence too: it depends on the rank of its p-value."""
    if d["low"] is None:
        return "n/a: one seed"
    level = f" ({100 * d['confidence']:.1f}%)" if "confidence" in d else ""
    return f"[{d['low']:+.4f}, {d['high']:+.4f}]{level}"


def fmt_effect(d):
    """A paired difference with its Holm interval, and * where that interval excludes 0."""
    if d["holm"]["low"] is None:
        return f"{d['mean']:+.4f}"
    mark = " *" if d["holm"]["excludes_zero"] else ""
    return f"{d['mean']:+.4f} [{d['holm']['low']:+.4f}, {d['holm']['high']:+.4f}]{mark}"


def fmt_p(p):
    return "n/a" if p is None else "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def table(header, rows):
    return ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def family_table(label, family):
    """One family of paired differences: per seed, raw and Holm-adjusted, and what it can detect."""
    seeds = sorted({x for d in family.values() for x in d["per_seed"]})
    return table([label, *(f"seed {x}" for x in seeds), "mean", f"raw {CONFIDENCE:.0%} interval",
                  "raw p", "Holm p", "Holm interval", "differs (Holm)", "paired std",
                  f"detectable ({POWER:.0%} power)"], [
        [name, *(f"{d['per_seed'][x]:+.4f}" if x in d["per_seed"] else "" for x in seeds),
         f"{d['mean']:+.4f}", fmt_interval(d), fmt_p(d["p"]), fmt_p(d["holm"]["p"]),
         fmt_interval(d["holm"]), {None: "n/a", False: "no"}.get(
             d["holm"]["excludes_zero"], "yes: lower" if d["mean"] < 0 else "yes: higher"),
         "n/a" if d["std"] is None else f"{d['std']:.4f}",
         "n/a" if d["detectable"] is None else f"{d['detectable']:.4f}"]
        for name, d in family.items()])


def summary_markdown(s, title=None):
    """A block as markdown: under its own title in a sweep, else as the whole summary."""
    base, claims = s["baseline"], s["original_claims"]
    budget = "; ".join(f"{it:,} iters = {tok:,} tokens" for it, tok in s["budgets"])
    head = [title] if title else [f"# Residual modes: {s['name']}", "", f"`{s['command']}`"]
    lines, rows = [*head, "", f"Every run: {budget}; the same validation windows. "
                   "Final eval loss (nats/token) as mean ± std over seeds."], []
    for m, e in s["modes"].items():
        speed, memory = e["tokens_per_sec"], e["peak_memory_bytes"]
        rows.append([m, e["name"], len(e["seeds"]), fmt(e["eval_loss"]),
                     fmt(e["eval_perplexity"], 2), fmt(e["eval_accuracy"]),
                     "n/a" if speed is None else f"{speed:,.0f}",
                     "n/a" if memory is None else f"{memory / 2**20:,.0f} MiB"])
    lines += table(["mode", "name", "seeds", "eval loss", "perplexity", "accuracy", "tokens/s",
                    "peak memory"], rows)
    lines += ["", "Ranking by mean final eval loss, best first: "
              + " > ".join(f"{m} ({s['modes'][m]['name']})" for m in s["ranking"])]
    differ = [f"{m} ({'lower' if d['mean'] < 0 else 'higher'})" for m, d in s["paired"].items()
              if d["holm"]["excludes_zero"]]
    lines += [f"Different from mode {base} after Holm's correction (what a ranking claim rests "
              f"on): {', '.join(differ) or 'none'}"]
    held = "held" if all(c["holds"] for c in claims) else "did not hold"
    original = (f"Original ranking (1 > 0 > 2, 3 ≥ 1): **{held}** at this scale on the mean "
                f"losses; its {len(claims)} comparisons (first mode's loss minus second's), "
                f"with Holm's correction within these {len(claims)}:" if claims else
                "Original ranking (1 > 0 > 2, 3 ≥ 1): not checked; it needs modes 0, 1, 2 and 3.")
    paired = (f"Final eval loss minus the baseline's, mode {base} ({s['modes'][base]['name']}), "
              "at the same seed: the same initial weights and batches (negative: better). A claim "
              "of a difference rests on the Holm-adjusted p-value and interval (Holm's correction "
              "over this table's rows); the raw ones show each difference on its own. `detectable`"
              f" is the smallest true difference these seeds find with {POWER:.0%} power at the "
              f"raw {1 - CONFIDENCE:.0%} level: a difference that is not found is below it.")
    families = [("mode", s["paired"], paired), ("claim", {
        f"{c['claim']} {'holds' if c['holds'] else 'fails'}": c for c in claims}, original)]
    for label, family, text in families:
        lines += ["", text] + (family_table(label, family) if family else [])
    for m, e in s["modes"].items():
        if "layer_weights" in e:
            w = e["layer_weights"]
            spread = max((x for row in w["std"] if row is not None for x in row), default=None)
            spread = "" if spread is None else f"; the largest std over seeds is {spread:.3f}"
            lines += ["", f"Learned mixing weights of mode {m} ({e['name']}) row by row (see "
                      f"layer_weights.txt), mean over {w['seeds']} seed(s){spread}:", "```",
                      *(f"block {i:>2}: " + " ".join(f"{v:.3f}" for v in row)
                        for i, row in enumerate(w["mean"]) if row is not None), "```"]
        if "note_correlation" in e:
            lines += ["", "Pearson's r of each block's mean weights with the original note's "
                      "(blocks 2 on; block 1 has only two): " + ", ".join(
                          f"{i}: {'n/a' if r is None else f'{r:+.2f}'}"
                          for i, r in enumerate(e["note_correlation"]) if i > 1)]
    if s["parallel"] > 1:
        lines += ["", f"Runs went {s['parallel']} at a time: tokens/s and memory were shared."]
    return "\n".join(lines) + "\n"


def sweep_markdown(summary):
    """The summary of a --sweep: a block per value, each mode's effect by value and its
    interaction with the value, then each value's raw losses against the first's."""
    lines = [f"# Residual modes: {summary['name']}", "", f"`{summary['command']}`", "",
             "One section per value of the sweep; within it, the runs of a seed share their "
             "initial weights and batches, as without a sweep."]
    values, blocks = list(summary["values"]), summary["values"]
    for name, block in blocks.items():
        lines += ["", summary_markdown(block, f"## {name}").rstrip("\n")]
    base = blocks[values[0]]["baseline"]
    lines += ["", "## Effect by value", "", f"Each mode's final eval loss minus mode {base}'s at "
              "the same seed, at each value: mean [Holm interval over that value's modes], * "
              "where it differs after Holm."]
    lines += table(["mode", *values], [
        [f"{m} ({blocks[values[0]]['modes'][m]['name']})", *map(fmt_effect, by_value.values())]
        for m, by_value in summary["effect_by_value"].items()])
    lines += ["", "## Interaction", "", f"(mode − mode {base}) at each value minus (mode − mode "
              f"{base}) at {values[0]}, seed by seed: does a mode's effect change with the value? "
              "Holm's correction over this table's rows."]
    lines += family_table("mode: values", summary["interaction"])
    lines += ["", "## Across values", ""]
    if summary["across_values"] is None:
        return "\n".join(lines + [f"Raw losses are not comparable across values of "
                                  f"{', '.join(summary['keys'])}: it changes the corpus, the eval "
                                  "set or the budget. The effects above are."]) + "\n"
    lines += ["Final eval loss at each value minus at the first, mode by mode, at the same seed; "
              "Holm's correction over this table's rows."]
    return "\n".join(lines + family_table("mode: values", summary["across_values"])) + "\n"


def plot_effect_by_value(effect, baseline, folder):
    """Each mode's paired effect at each value, with its Holm interval: effect_by_value.png."""
    plt = report.pyplot("compare.py", "no plots") if effect else None  # effect: another mode
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(0, color="k", lw=0.8)
    values = [v.replace(",", "\n") for v in next(iter(effect.values()))]  # a key a line
    for i, (m, by_value) in enumerate(effect.items()):
        means = [d["mean"] for d in by_value.values()]
        bounds = [(d["holm"]["low"], d["holm"]["high"]) if d["holm"]["low"] is not None
                  else (d["mean"], d["mean"]) for d in by_value.values()]  # one seed: no interval
        errors = [[mu - low for mu, (low, _) in zip(means, bounds)],
                  [high - mu for mu, (_, high) in zip(means, bounds)]]
        ax.errorbar([j + 0.04 * i for j in range(len(values))], means, yerr=errors,
                    color=f"C{i}", marker="o", capsize=3, label=f"mode {m}")
    ax.set(xticks=range(len(values)), xticklabels=values, title="effect by value: mean over "
           f"seeds, Holm interval", ylabel=f"final eval loss minus mode {baseline}'s, same seed")
    ax.legend()
    report.save_figure(plt, fig, os.path.join(folder, "effect_by_value.png"))


def plot_results(summary, results, folder):
    plt = report.pyplot("compare.py", "no plots")
    if plt is None:
        return
    base = summary["baseline"]
    loss_fig, (loss_ax, diff_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    loss_ax.set(xlabel="training tokens", ylabel="val loss (nats/token)",
                title="val loss: mean over seeds, band from min to max")
    diff_ax.set(xlabel="training tokens", ylabel=f"val loss minus mode {base}'s, same seed",
                title="paired difference: mean over seeds, band from min to max")
    diff_ax.axhline(0, color="k", lw=0.8)
    base_curves = {r["seed"]: dict(r["curve"]) for r in results if r["mode"] == base}
    rate_fig, rate_ax = plt.subplots(figsize=(6, 4.5))  # a dot per run, a cross per mode's mean
    rate_ax.set(xlabel="training tokens/s (median per run)", ylabel="final eval loss (nats/token)",
                title="quality against throughput (down and right is better)")
    for i, (m, e) in enumerate(summary["modes"].items()):
        rs, color, label = [r for r in results if r["mode"] == m], f"C{i}", f"{m} {e['name']}"
        curves = {r["seed"]: dict(r["curve"]) for r in rs}
        tokens = sorted(set.intersection(*map(set, curves.values())))
        tokens = tokens[1:] if len(tokens) > 2 else tokens  # step 0's loss would squash the scale
        bands = [(loss_ax, [[c[t] for c in curves.values()] for t in tokens])]  # per eval, seeds
        if m != base:
            bands.append((diff_ax, [[c[t] - base_curves[s][t] for s, c in curves.items()
                                     if t in base_curves.get(s, {})] for t in tokens]))
        for ax, values in bands:
            ax.plot(tokens, [statistics.fmean(x) for x in values], color=color, label=label)
            ax.fill_between(tokens, [min(x) for x in values], [max(x) for x in values],
                            color=color, alpha=0.2)
        if e["tokens_per_sec"] is not None:
            timed = [r for r in rs if r["tokens_per_sec"] is not None]
            rate_ax.scatter([r["tokens_per_sec"] for r in timed], [r["eval_loss"] for r in timed],
                            color=color, alpha=0.4, s=18)
            rate_ax.scatter([e["tokens_per_sec"]], [e["eval_loss"]["mean"]], color=color,
                            marker="X", s=90, label=label)
        if "layer_weights" in e:  # the mean weights over seeds and, beside it, their std
            w, n = e["layer_weights"], max(9, len(e["layer_weights"]["mean"]))  # n: room to draw
            panels = [("mean", w["mean"], 2), ("std over seeds", w["std"], 3)][:min(w["seeds"], 2)]
            fig, axes = plt.subplots(1, len(panels), squeeze=False,
                                     figsize=(len(panels) * (1.2 + 0.55 * n), 0.8 + 0.5 * n))
            for ax, (title, rows, digits) in zip(axes[0], panels):
                report.draw_layer_heatmap(fig, ax, rows, digits, model_lib.MODES[m],
                                          f"mode {m}: {title} ({w['seeds']} seeds)")
            report.save_figure(plt, fig, os.path.join(folder, f"layer_weights_mode{m}.png"))
        if "note_correlation" in e:  # this sweep's mean weights beside the original note's
            fig, axes = plt.subplots(1, 2, figsize=(2 * (1.2 + 0.55 * n), 0.8 + 0.5 * n))
            for ax, rows, title in ((axes[0], w["mean"], f"this sweep: mean of {w['seeds']} seeds"),
                                    (axes[1], read_note_weights(), "the original note (768 wide)")):
                report.draw_layer_heatmap(fig, ax, rows, 2, model_lib.MODES[m], title)
            report.save_figure(plt, fig, os.path.join(folder, "layer_weights_vs_note.png"))
    for fig, ax, name in ((loss_fig, loss_ax, "val_loss"),
                          (rate_fig, rate_ax, "quality_vs_throughput")):
        ax.legend()
        report.save_figure(plt, fig, os.path.join(folder, f"{name}.png"))


def dry_run(runs, args):
    print(f"compare.py: {len(runs)} runs, {args.parallel} at a time; results in "
          f"{RESULTS_DIR}/{args.name}")
    print(f"the config every run shares ({' '.join(args.configs)} and flags, resolved):")
    print("\n".join(f"  {k} = {v!r}" for k, v in runs[0]["config"].items() if k not in SET_PER_RUN))
    print("the runs, which differ only in these (and their state: new, resume or done):")
    for r in runs:
        print(f"  residual_mode = {r['mode']} ({model_lib.MODES[r['mode']].name}), "
              f"seed = {r['seed']}, out_dir = {r['out_dir']}: {run_state(r)}")
    print(f"each: python train.py {shlex.join(runs[0]['argv'][:-3])} --residual_mode=M --seed=S")


def main(argv):
    args, flags = parse_args(argv)
    try:  # a bad config or a missing dataset: one line here, not failed runs
        runs = plan_runs(args, flags)
        if args.dry_run:
            return dry_run(runs, args)
        lock_fds = lock_sweep(os.path.join(RUNS_DIR, args.name))
        for data_dir, dataset in {(r["config"]["data_dir"], r["config"]["dataset"]) for r in runs}:
            prepare.ensure_builtin(data_dir, dataset)  # once, here, not by each parallel run
            shards.read_meta(os.path.join(data_dir, dataset))
    except (configurator.ConfigError, prepare.DataError) as e:
        raise CompareError(e) from None
    run_sweep(runs, args, lock_fds)
    results, command = [load_run(run) for run in runs], shlex.join(["python", "compare.py", *argv])
    folder, names = os.path.join(RESULTS_DIR, args.name), [value_name(p) for p in args.grid]
    blocks = {v: summarize([r for r in results if r["value"] == v], args, command) for v in names}
    for v, block in blocks.items():  # plots: results/NAME, or results/NAME/VALUE in a sweep
        os.makedirs(os.path.join(folder, v), exist_ok=True)
        plot_results(block, [r for r in results if r["value"] == v], os.path.join(folder, v))
    if args.sweep:
        keys = list(args.grid[0])
        effect, interaction = effect_by_value(blocks)
        summary = {"name": args.name, "command": command, "keys": keys, "values": blocks,
                   "effect_by_value": effect, "interaction": interaction, "across_values": None
                   if set(keys) & set(INCOMPARABLE) else across_values(blocks)}
        plot_effect_by_value(effect, args.baseline, folder)
        text = sweep_markdown(summary)
    else:
        summary, text = blocks[""], summary_markdown(blocks[""])
    report.atomic_write(os.path.join(folder, "summary.md"), text)
    report.atomic_write(os.path.join(folder, "summary.json"), json.dumps(summary, indent=1))
    print(text, end="")
    print(f"wrote {folder}/summary.md, summary.json and plots")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a pipe or log file at once
    try:
        main(sys.argv[1:])
    except CompareError as e:
        sys.exit(f"compare.py: {e}")
