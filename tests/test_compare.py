"""compare.py: the statistics against hand-computed and textbook values, the summary against synthetic and
real runs' own metrics.jsonl, and a sweep that is killed and restarted."""
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

import compare
import model as model_lib
import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# statistics

# two-sided 95% points t_{0.975, df} from any textbook table
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def test_t_quantile_matches_the_tables():
    for df, t in T_975.items():
        assert compare.t_quantile(0.975, df) == pytest.approx(t, abs=6e-4), df
    # other levels, and the symmetry of the distribution
    assert compare.t_quantile(0.95, 1) == pytest.approx(6.314, abs=6e-4)
    assert compare.t_quantile(0.995, 2) == pytest.approx(9.925, abs=6e-4)
    assert compare.t_quantile(0.99, 5) == pytest.approx(3.365, abs=6e-4)
    assert compare.t_quantile(0.025, 4) == pytest.approx(-compare.t_quantile(0.975, 4), abs=1e-12)
    assert compare.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    # far out, t tends to the normal: 1.95996...
    assert compare.t_quantile(0.975, 2000) == pytest.approx(1.9612, abs=2e-4)


def t_density(x, df):
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def test_t_probability_matches_numerical_integration():
    """An independent reference: Simpson's rule over the density from -t to t."""
    for df in (1, 2, 3, 4, 7, 12):
        for t in (0.3, 1.0, 2.5, 6.0):
            n = 4000
            h = 2 * t / n
            simpson = t_density(-t, df) + t_density(t, df)
            simpson += sum((4 if i % 2 else 2) * t_density(-t + i * h, df) for i in range(1, n))
            assert compare.t_within(t, df) == pytest.approx(simpson * h / 3, abs=1e-9), (df, t)


def test_mean_std_by_hand():
    mean, std = compare.mean_std([2, 4, 4, 4, 5, 5, 7, 9])  # sum of squared deviations 32, n - 1 = 7
    assert mean == 5 and std == pytest.approx(math.sqrt(32 / 7), rel=1e-12)
    assert compare.mean_std([3.5]) == (3.5, None)


def test_paired_interval_by_hand():
    a = {0: 3.0, 1: 3.2, 2: 3.1}
    b = {0: 4.0, 1: 4.4, 2: 3.9, 7: 9.9}  # seed 7 has no partner: left out
    d = compare.paired_interval(a, b)
    assert d["per_seed"] == pytest.approx({0: -1.0, 1: -1.2, 2: -0.8})
    # mean -1, sd sqrt((0 + 0.04 + 0.04) / 2) = 0.2, se 0.2 / sqrt(3), t_{0.975, 2} = 4.302653
    half = 4.302653 * 0.2 / math.sqrt(3)
    assert d["mean"] == pytest.approx(-1.0) and d["std"] == pytest.approx(0.2)
    assert (d["low"], d["high"]) == pytest.approx((-1 - half, -1 + half), abs=1e-6)
    assert d["excludes_zero"] is True
    wide = compare.paired_interval({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})  # diffs 1, 2, 3
    assert (wide["low"], wide["high"]) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), abs=1e-6)
    assert wide["excludes_zero"] is False


def test_one_seed_gives_no_interval():
    d = compare.paired_interval({0: 3.0}, {0: 3.5})
    assert d["mean"] == pytest.approx(-0.5) and d["low"] is None and d["high"] is None
    assert d["excludes_zero"] is None and d["p"] is None


def test_p_value_matches_the_tables():
    # two-sided p of a t statistic: T_975 holds the points where p = 0.05
    for df, t in T_975.items():
        d = {"per_seed": dict.fromkeys(range(df + 1)), "mean": t, "std": math.sqrt(df + 1)}
        assert compare.p_value(d) == pytest.approx(0.05, abs=2e-4), df
    # diffs 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641 with df 2 -> p = 0.074180 (1 - t_within)
    d = compare.paired_interval({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert d["p"] == pytest.approx(0.0741799, abs=1e-6)
    assert compare.p_value({"per_seed": {0: 0, 1: 0}, "mean": 0.0, "std": 0.0}) == 1.0


def test_holm_by_hand():
    # sorted: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to 0.06 by monotonicity)
    adjusted, confidence = compare.holm([0.01, 0.04, 0.03])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06])
    # Holm rejects rank 1 only (0.03 < 0.05 <= 0.06): j* = 2, so ranks 2 and 3 share 1 - 0.05/2
    assert confidence == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 2, 1 - 0.05 / 2])
    adjusted, confidence = compare.holm([0.004, 0.02, 0.012])  # all rejected: 0.012, 0.024, 0.02
    assert adjusted == pytest.approx([0.012, 0.024, 0.024])
    assert confidence == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 1, 1 - 0.05 / 2])
    assert compare.holm([0.5, 0.9]) == (pytest.approx([1.0, 1.0]), pytest.approx([0.975, 0.975]))
    assert compare.holm([0.03]) == ([0.03], [0.95])  # one comparison: nothing to correct
    assert compare.holm([]) == ([], [])


def test_holm_interval_excludes_zero_iff_holm_rejects():
    """Synthetic families of three comparisons, from clear to none: the adjusted interval and the
    adjusted p-value must agree, the adjusted interval is never narrower than the raw one, and
    Holm sometimes keeps a difference that the raw interval would claim."""
    rng = random.Random(1)
    base = {s: 3.0 + rng.gauss(0, 0.05) for s in range(4)}
    kept_by_holm = 0
    for trial in range(300):
        family = []
        for _ in range(3):
            shift = rng.choice([0.0, 0.02, 0.05, 0.1])
            other = {s: v + shift + rng.gauss(0, 0.03) for s, v in base.items()}
            family.append(compare.paired_interval(other, base))
        compare.adjust_family(family)
        for d in family:
            h = d["holm"]
            assert h["excludes_zero"] == (h["p"] < 0.05), (trial, d)
            assert h["p"] >= d["p"] and h["low"] <= d["low"] and h["high"] >= d["high"]
            kept_by_holm += d["excludes_zero"] and not h["excludes_zero"]
    assert kept_by_holm > 0


# -----------------------------------------------------------------------------
# the summary, from synthetic run folders

def fake_run(root, mode, seed, loss, n_layer=3):
    """A finished run folder as train.py leaves it: metrics.jsonl and layer_weights.json."""
    out = os.path.join(root, f"mode{mode}_seed{seed}")
    os.makedirs(out)
    def scores(x):
        return {"eval_loss": x, "eval_perplexity": math.exp(x), "eval_accuracy": 0.5 - x / 10}

    records = [{"type": "start", "iter": 0, "resumed": False},
               {"type": "eval", "iter": 0, "tokens": 0, **scores(5.5)},
               *({"type": "train", "iter": i, "tokens": 100 * i, "loss": 5.0, "tokens_per_sec": tps}
                 for i, tps in ((5, 10.0), (10, 1000.0 + mode), (15, 1200.0), (20, 1100.0))),
               {"type": "eval", "iter": 20, "tokens": 2000, **scores(loss)},
               {"type": "done", "iter": 20, "tokens": 2000, **scores(loss), "elapsed": 3.0,
                "peak_memory_bytes": (100 + seed) * 2**20}]
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    rng = random.Random(seed)
    layers = [{"index": 0, "count": 0, "raw": None, "normalized": None}]
    for m in range(1, n_layer):
        w = [rng.random() for _ in range(m + 1)] if mode == 3 else None
        layers.append({"index": m, "count": m + 1 if w else 0, "raw": w, "normalized": w and [x / sum(w) for x in w]})
    with open(os.path.join(out, "layer_weights.json"), "w") as f:
        json.dump({"saved_at": "now", "config": {}, "layers": layers}, f)
    return {"mode": mode, "seed": seed, "value": "", "name": os.path.basename(out), "out_dir": out}


def synthetic_args(modes, seeds, baseline=0):
    args, _ = compare.parse_args(["cfg.py", f"--modes={','.join(map(str, modes))}", f"--seeds={seeds}",
                                  f"--baseline={baseline}", "--name=synthetic"])
    return args


def test_summary_of_synthetic_runs(tmp_path):
    # mode -> per-seed final losses; the original ranking holds: 3 < 1 < 0 < 2 in loss
    losses = {0: [3.00, 3.10, 3.05], 1: [2.90, 3.02, 2.96], 2: [3.20, 3.24, 3.30], 3: [2.88, 3.01, 2.93]}
    runs = [fake_run(str(tmp_path), m, s, loss) for m, ls in losses.items() for s, loss in enumerate(ls)]
    results = [compare.load_run(r) for r in runs]
    s = compare.summarize(results, synthetic_args([0, 1, 2, 3], 3), "python compare.py cfg.py")
    for m, ls in losses.items():
        e = s["modes"][m]
        assert e["eval_loss"]["mean"] == pytest.approx(statistics.mean(ls))
        assert e["eval_loss"]["std"] == pytest.approx(statistics.stdev(ls))
        assert e["eval_perplexity"]["mean"] == pytest.approx(statistics.mean(math.exp(x) for x in ls))
        assert e["tokens_per_sec"] == pytest.approx(1100.0)  # the median without the first (warm-up) rate
        assert e["peak_memory_bytes"] == 102 * 2**20  # the largest over seeds
    assert s["ranking"] == [3, 1, 0, 2]
    diffs = [a - b for a, b in zip(losses[2], losses[0])]
    half = T_975[2] * statistics.stdev(diffs) / math.sqrt(3)
    p = s["paired"][2]
    assert (p["mean"], p["low"], p["high"]) == pytest.approx(
        (statistics.mean(diffs), statistics.mean(diffs) - half, statistics.mean(diffs) + half), abs=1e-3)
    assert [c["holds"] for c in s["original_claims"]] == [True, True, True]
    # Holm within each family: 3 comparisons against the baseline, and the 3 original claims
    for family in (list(s["paired"].values()), s["original_claims"]):
        adjusted, _ = compare.holm([d["p"] for d in family])
        assert [d["holm"]["p"] for d in family] == pytest.approx(adjusted)
        assert len(family) == 3 and min(adjusted) == pytest.approx(3 * min(d["p"] for d in family))
    assert s["budgets"] == [(20, 2000)]
    # the learned weights: the mean over seeds of each block's row, read independently from the files
    rows = [json.load(open(os.path.join(r["out_dir"], "layer_weights.json")))["layers"] for r in runs if r["mode"] == 3]
    for m in (1, 2):
        per_seed = np.array([layers[m]["normalized"] for layers in rows])
        assert s["modes"][3]["layer_weights"]["mean"][m] == pytest.approx(per_seed.mean(0).tolist())
        assert s["modes"][3]["layer_weights"]["std"][m] == pytest.approx(per_seed.std(0, ddof=1).tolist())
    assert "layer_weights" not in s["modes"][1]
    text = compare.summary_markdown(s)
    assert "**held**" in text
    assert f"| 2 | attn_mean | 3 | {statistics.mean(losses[2]):.4f} ± {statistics.stdev(losses[2]):.4f} |" in text
    assert "1 (mlp_mean) > 0 (standard)" in text and "| 2 | +0.2000 | +0.1400 | +0.2500 | +0.1967 |" in text
    header = next(line for line in text.splitlines() if line.startswith("| mode | seed 0"))
    for column in ("raw 95% interval", "raw p", "Holm p", "Holm interval"):
        assert column in header
    assert "rests on the Holm-adjusted" in text and "Holm's correction within these 3" in text
    differ = [m for m, d in s["paired"].items() if d["holm"]["p"] < 0.05]
    assert f"after Holm's correction (what a ranking claim rests on): " + (
        ", ".join(f"{m} (higher)" if s["paired"][m]["mean"] > 0 else f"{m} (lower)" for m in differ) or "none") in text
    row = next(line for line in text.splitlines() if line.startswith("| 2 | +0.2000"))
    assert f"| {compare.fmt_p(p['p'])} | {compare.fmt_p(p['holm']['p'])} |" in row
    json.dumps(s, allow_nan=False)  # valid JSON: no NaN anywhere


def test_summary_with_one_seed_says_no_interval(tmp_path):
    runs = [fake_run(str(tmp_path), m, 0, loss) for m, loss in ((0, 3.0), (1, 3.1))]
    s = compare.summarize([compare.load_run(r) for r in runs], synthetic_args([0, 1], 1), "cmd")
    text = compare.summary_markdown(s)
    assert s["paired"][1]["low"] is None and "n/a: one seed" in text
    assert "not checked; it needs modes 0, 1, 2 and 3" in text
    assert "| 1 | mlp_mean | 1 | 3.1000 |" in text  # no ± without a second seed


def t_test_p_df2(diffs):
    """The paired t-test's two-sided p with 3 seeds, from Student's t at 2 degrees of freedom in closed
    form: P(|T| > t) = 1 - t / sqrt(t^2 + 2)."""
    t = abs(statistics.mean(diffs)) / (statistics.stdev(diffs) / math.sqrt(3))
    return 1 - t / math.sqrt(t * t + 2)


def test_effect_by_value_and_interaction_of_a_sweep(tmp_path):
    """Two values (two corpora, say) x modes 0, 1, 2 x 3 seeds with known losses: the effect table holds each
    value's paired differences to mode 0, and the interaction rows the differences of those differences, seed
    by seed, with Holm's correction over the interaction rows checked against a hand-computed adjustment."""
    losses = {"dataset=a": {0: [3.00, 3.10, 3.05], 1: [2.90, 3.02, 2.96], 2: [3.01, 3.12, 3.02]},
              "dataset=b": {0: [2.00, 2.20, 2.10], 1: [2.04, 2.23, 2.16], 2: [2.02, 2.19, 2.11]}}
    blocks = {}
    for value, modes in losses.items():
        runs = [{**fake_run(str(tmp_path / value), m, s, loss), "value": value}
                for m, ls in modes.items() for s, loss in enumerate(ls)]
        blocks[value] = compare.summarize([compare.load_run(r) for r in runs], synthetic_args([0, 1, 2], 3), "cmd")
    effect, interaction = compare.effect_by_value(blocks)
    diff = {(v, m): [losses[v][m][s] - losses[v][0][s] for s in range(3)] for v in losses for m in (1, 2)}
    for (v, m), d in diff.items():
        assert list(effect[m][v]["per_seed"].values()) == pytest.approx(d)
        assert effect[m][v]["holm"]["p"] == blocks[v]["paired"][m]["holm"]["p"]  # each value's own family
    rows = {m: [b - a for a, b in zip(diff["dataset=a", m], diff["dataset=b", m])] for m in (1, 2)}
    assert list(interaction) == ["1: dataset=b − dataset=a", "2: dataset=b − dataset=a"]
    for m, name in zip((1, 2), interaction):
        assert list(interaction[name]["per_seed"].values()) == pytest.approx(rows[m])
        assert interaction[name]["mean"] == pytest.approx(statistics.mean(rows[m]))
        assert interaction[name]["p"] == pytest.approx(t_test_p_df2(rows[m]), abs=1e-9)
    p = [t_test_p_df2(rows[m]) for m in (1, 2)]  # Holm over 2: the smaller p times 2, the larger at least that
    low, high = sorted(range(2), key=lambda i: p[i])
    expected = {low: min(1, 2 * p[low])}
    expected[high] = max(expected[low], p[high])
    assert [interaction[n]["holm"]["p"] for n in interaction] == pytest.approx([expected[0], expected[1]])
    text = compare.sweep_markdown({"name": "x", "command": "cmd", "keys": ["dataset"], "values": blocks,
                                   "effect_by_value": effect, "interaction": interaction, "across_values": None})
    mean_1a = statistics.mean(diff["dataset=a", 1])
    assert "## Effect by value" in text and f"| 1 (mlp_mean) | {mean_1a:+.4f} [" in text
    assert "## Interaction" in text and f"| 1: dataset=b − dataset=a | {rows[1][0]:+.4f} |" in text
    assert "not comparable" in text and "## Across values" in text
    pytest.importorskip("matplotlib")
    compare.plot_effect_by_value(effect, 0, str(tmp_path))
    assert (tmp_path / "effect_by_value.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreadable_results_are_one_line_errors(tmp_path):
    run = fake_run(str(tmp_path), 0, 0, 3.0)
    (tmp_path / "mode0_seed0" / "layer_weights.json").write_text('{"layers": [')  # torn
    with pytest.raises(compare.CompareError, match="cannot read the results in .*mode0_seed0.*delete that folder"):
        compare.load_run(run)


# -----------------------------------------------------------------------------
# arguments and dry runs, in process

def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.py").write_text("n_layer = 2\n")
    cases = [(["cfg.py", "--max_iter=5"], "did you mean 'max_iters'"),
             (["cfg.py", "--seed=3"], "use --seeds"),
             (["cfg.py", "--modes=0,1", "--baseline=2"], "--baseline 2 is not among"),
             (["cfg.py", f"--modes=0,{len(model_lib.MODES)}"], "unknown residual_mode"),
             (["cfg.py", "--parallel=2", "--gpus=0,1"], "not allowed with"),
             (["missing.py"], "config file 'missing.py' not found"),
             (["cfg.py", "--seeds=two"], "invalid int value")]
    for argv, needle in cases:
        with pytest.raises(compare.CompareError) as e:
            compare.main(argv)
        assert needle in str(e.value) and "\n" not in str(e.value), argv
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_every_run_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.py").write_text("n_layer = 2\nn_head = 2\nn_embd = 32\n")
    compare.main(["cfg.py", "--modes=0,mlp_learned", "--seeds=2", "--max_iters=7", "--dry-run"])
    out = capsys.readouterr().out
    assert "  n_layer = 2\n" in out and "  max_iters = 7\n" in out and "  n_embd = 32\n" in out
    for mode, seed in ((0, 0), (3, 0), (0, 1), (3, 1)):
        assert f"residual_mode = {mode}" in out and f"runs/cfg/mode{mode}_seed{seed}" in out
    assert out.count(" new\n") == 4
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_changed_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.py").write_text("n_layer = 2\n")
    run = compare.plan_runs(*compare.parse_args(["cfg.py", "--modes=0", "--seeds=1", "--max_iters=7"]))[0]
    os.makedirs(run["out_dir"])
    with open(os.path.join(run["out_dir"], "compare.json"), "w") as f:
        json.dump({**run["config"], "max_iters": 5}, f)
    with pytest.raises(compare.CompareError, match="max_iters 5 then, 7 now"):
        compare.main(["cfg.py", "--modes=0", "--seeds=1", "--max_iters=7", "--dry-run"])


# -----------------------------------------------------------------------------
# a real tiny sweep: killed after its first run, restarted, summarized

TINY_CONFIG = """
dataset = "tiny"
data_dir = {data_dir!r}
n_layer = 3
n_head = 2
n_embd = 32
block_size = 32
batch_size = 4
gradient_accumulation_steps = 1
max_epochs = 0.0  # the budget is max_iters
max_iters = 80
warmup_iters = 5
eval_interval = 20
eval_iters = 2
log_interval = 5
ckpt_interval = 5
compile = False
dtype = "float32"
device = "cpu"
peak_flops = 1e12  # skips measuring the CPU
"""


def read_records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_killed_sweep_resumes_and_summaries_match_the_runs(tmp_path):
    rng = random.Random(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        words = (rng.choice(["def", "class", "self", "x", "return", "for"]) for _ in range(300))
        (src / f"doc{i}.txt").write_text(" ".join(words))
    prepare.prepare([str(src)], name="tiny", tokenizer="byte", data_dir=str(tmp_path / "data"), val_fraction=0.2,
                    workers=1, quiet=True)
    (tmp_path / "tiny.py").write_text(TINY_CONFIG.format(data_dir=str(tmp_path / "data")))
    command = [sys.executable, os.path.join(ROOT, "compare.py"), "tiny.py", "--modes=0,3", "--seeds=2"]
    names = ("mode0_seed0", "mode3_seed0", "mode0_seed1", "mode3_seed1")  # seed-major: pairs complete early
    runs = {name: str(tmp_path / "runs" / "tiny" / name) for name in names}

    # first attempt: stopped (SIGTERM) once the second run has its first checkpoint
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.exists(os.path.join(runs["mode3_seed0"], "ckpt.pt")), first)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=180)
    assert first.returncode != 0 and "rerun the same command" in err and len(err.strip().splitlines()) == 1, (out, err)
    assert read_records(runs["mode0_seed0"])[-1]["type"] == "done"
    assert all(r["type"] != "done" for r in read_records(runs["mode3_seed0"]))
    assert not os.path.exists(runs["mode0_seed1"])
    finished = {f: os.stat(os.path.join(runs["mode0_seed0"], f)).st_mtime_ns
                for f in ("metrics.jsonl", "ckpt.pt", "train.log")}

    # second attempt, two at a time: the finished run is skipped, the stopped one resumes
    second = subprocess.run(command + ["--parallel=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "mode0_seed0: already done, skipped" in second.stdout
    assert "mode3_seed0: resuming from its checkpoint" in second.stdout
    assert finished == {f: os.stat(os.path.join(runs["mode0_seed0"], f)).st_mtime_ns for f in finished}
    resumed = read_records(runs["mode3_seed0"])
    assert [r["resumed"] for r in resumed if r["type"] == "start"] == [False, True] and resumed[-1]["iter"] == 80
    assert "--init_from=resume" in open(os.path.join(runs["mode3_seed0"], "train.log")).read()

    # every run trained on the same config but for the mode and the seed (as train.py resolved it; the
    # resumed one also says so)
    configs = {n: json.load(open(os.path.join(d, "config.json"))) for n, d in runs.items()}
    assert configs["mode3_seed0"]["init_from"] == "resume"
    strip = lambda c: {k: v for k, v in c.items() if k not in ("residual_mode", "seed", "out_dir", "init_from")}
    assert all(strip(c) == strip(configs["mode0_seed0"]) for c in configs.values())

    # the summaries against each run's own metrics.jsonl
    summary = json.load(open(tmp_path / "results" / "tiny" / "summary.json"))
    text = (tmp_path / "results" / "tiny" / "summary.md").read_text()
    assert text in second.stdout  # the terminal shows the same table
    final = {n: read_records(d)[-1] for n, d in runs.items()}
    for n, d in runs.items():
        evals = [r for r in read_records(d) if r["type"] == "eval"]
        assert final[n]["type"] == "done" and final[n]["eval_loss"] == evals[-1]["eval_loss"]
        assert [r["tokens"] for r in evals] == [0, 2560, 5120, 7680, 10240]  # the same budget and eval points
        row = next(r for r in summary["runs"] if r["out_dir"] == os.path.join("runs", "tiny", n))
        assert row["eval_loss"] == final[n]["eval_loss"] and row["eval_accuracy"] == final[n]["eval_accuracy"]
    for mode in (0, 3):
        losses = [final[f"mode{mode}_seed{s}"]["eval_loss"] for s in (0, 1)]
        e = summary["modes"][str(mode)]
        assert e["eval_loss"]["mean"] == pytest.approx(statistics.mean(losses), rel=1e-12)
        assert e["eval_loss"]["std"] == pytest.approx(statistics.stdev(losses), rel=1e-9)
        assert f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}" in text
    diffs = [final[f"mode3_seed{s}"]["eval_loss"] - final[f"mode0_seed{s}"]["eval_loss"] for s in (0, 1)]
    p = summary["paired"]["3"]
    half = T_975[1] * statistics.stdev(diffs) / math.sqrt(2)
    assert p["per_seed"] == pytest.approx({"0": diffs[0], "1": diffs[1]}, rel=1e-9)
    assert (p["low"], p["high"]) == pytest.approx((statistics.mean(diffs) - half, statistics.mean(diffs) + half), rel=1e-3)
    # one comparison against the baseline: Holm changes nothing
    assert p["holm"]["p"] == p["p"] and p["holm"]["low"] == pytest.approx(p["low"])
    weights = [json.load(open(os.path.join(runs[f"mode3_seed{s}"], "layer_weights.json")))["layers"][2]["normalized"]
               for s in (0, 1)]
    assert summary["modes"]["3"]["layer_weights"]["mean"][2] == pytest.approx(np.mean(weights, axis=0).tolist(), rel=1e-9)
    pytest.importorskip("matplotlib")
    for png in ("val_loss.png", "quality_vs_throughput.png", "layer_weights_mode3.png"):
        assert (tmp_path / "results" / "tiny" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -----------------------------------------------------------------------------
# power, the note side by side, and --sweep

def test_detectable_difference_by_hand_and_by_simulation():
    # (t_0.975 + t_0.80) * sd / sqrt(n), the t quantiles from the tables: df 4: 2.776445, 0.940965
    assert compare.detectable(0.01, 5) == pytest.approx((2.776445 + 0.940965) * 0.01 / math.sqrt(5), abs=1e-7)
    assert compare.detectable(0.02, 3) == pytest.approx((4.302653 + 1.060660) * 0.02 / math.sqrt(3), abs=1e-7)
    d = compare.paired_interval({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert d["detectable"] == pytest.approx(compare.detectable(statistics.stdev([1, 2, 4]), 3))
    # a true difference of that size is found about 80% of the time by the paired t-test at 5 seeds
    x = np.random.default_rng(0).normal(compare.detectable(1.0, 5), 1.0, size=(40000, 5))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(5))
    assert 0.78 < np.mean(np.abs(t) > T_975[4]) < 0.81


def test_mode3_weights_are_set_beside_the_notes(tmp_path):
    runs = [fake_run(str(tmp_path), m, s, 3.0 - 0.1 * m + 0.01 * s, n_layer=12) for m in (0, 3) for s in range(3)]
    s = compare.summarize([compare.load_run(r) for r in runs], synthetic_args([0, 3], 3), "cmd")
    note = json.load(open(os.path.join(ROOT, "docs", "note_method3_layer_weights.json")))["layers"]
    assert note[11]["normalized"] == pytest.approx(np.exp(note[11]["raw"]) / np.exp(note[11]["raw"]).sum())
    mean = s["modes"][3]["layer_weights"]["mean"]
    r = s["modes"][3]["note_correlation"]
    assert r[:2] == [None, None]  # block 0 has no weights, block 1 only two
    for m in range(2, 12):
        assert r[m] == pytest.approx(np.corrcoef(mean[m], note[m]["normalized"])[0, 1])
    assert f"11: {r[11]:+.2f}" in compare.summary_markdown(s)
    assert "note_correlation" not in s["modes"][0]
    pytest.importorskip("matplotlib")
    compare.plot_results(s, [compare.load_run(r) for r in runs], str(tmp_path))
    for png in ("layer_weights_vs_note.png", "val_loss.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_refuses_unknown_or_doubled_keys():
    for argv, words in ((["--sweep", "mixing_lr_mul=1,10"], "unknown config key 'mixing_lr_mul'.*did you mean 'mixing_lr_mult'"),
                        (["--sweep", "seed=1,2"], "--sweep seed=1,2: give a config key that is not set otherwise"),
                        (["--sweep", "n_layer=2,3", "--n_layer=4"], "not set otherwise"),
                        (["--sweep", "n_layer="], "its values"),
                        (["--sweep", "learning_rate/min_lr=1e-3/1e-4,4e-3"], "one per key"),
                        (["--sweep", "learning_rate/seed=1e-3/1"], "not set otherwise")):
        with pytest.raises(compare.CompareError, match=words):
            compare.parse_args(["cfg.py", *argv])
    args, _ = compare.parse_args(["cfg.py", "--sweep", "n_layer=2,3", "--sweep", "dropout=0,0.1"])
    assert [compare.value_name(p) for p in args.grid] == [
        "n_layer=2,dropout=0", "n_layer=2,dropout=0.1", "n_layer=3,dropout=0", "n_layer=3,dropout=0.1"]
    args, _ = compare.parse_args(["cfg.py", "--sweep", "learning_rate/min_lr=1e-3/1e-4,4e-3/4e-4"])
    assert args.grid == [{"learning_rate": "1e-3", "min_lr": "1e-4"}, {"learning_rate": "4e-3", "min_lr": "4e-4"}]
    assert [compare.value_name(p) for p in args.grid] == ["learning_rate=1e-3,min_lr=1e-4",
                                                         "learning_rate=4e-3,min_lr=4e-4"]


def run_tiny_sweep(tmp_path, corpora, *flags):
    """Byte datasets of 20 documents of random words, {name: words}, and a compare.py sweep over tiny.py."""
    rng = random.Random(1)
    for name, words in corpora.items():
        src = tmp_path / f"src_{name}"
        src.mkdir()
        for i in range(20):
            (src / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)))
        prepare.prepare([str(src)], name=name, tokenizer="byte", data_dir=str(tmp_path / "data"), val_fraction=0.2,
                        workers=1, quiet=True)
    (tmp_path / "tiny.py").write_text(TINY_CONFIG.format(data_dir=str(tmp_path / "data")))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), "tiny.py", "--modes=0,3", "--seeds=2",
                             *flags, "--parallel=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_sweep_pairs_runs_within_each_value_and_summarizes_each(tmp_path):
    result = run_tiny_sweep(tmp_path, {"tiny": ["def", "self", "x", "for"]}, "--sweep", "mixing_lr_mult=1,300",
                            "--max_iters=6", "--eval_interval=3")
    values = ("mixing_lr_mult=1", "mixing_lr_mult=300")
    folder = {(v, m, s): str(tmp_path / "runs" / "tiny" / v / f"mode{m}_seed{s}")
              for v in values for m in (0, 3) for s in (0, 1)}
    evals = {k: [r["eval_loss"] for r in read_records(d) if r["type"] == "eval"] for k, d in folder.items()}
    configs = {k: json.load(open(os.path.join(d, "config.json"))) for k, d in folder.items()}
    for (v, m, s), c in configs.items():
        assert (c["residual_mode"], c["seed"], c["mixing_lr_mult"]) == (m, s, float(v.split("=")[1]))
    strip = lambda c: {k: v for k, v in c.items() if k not in ("residual_mode", "seed", "out_dir", "mixing_lr_mult")}
    assert all(strip(c) == strip(configs[values[0], 0, 0]) for c in configs.values())
    for s in (0, 1):
        # same seed, other value: the same init and batches, so mode 0 (no mixing weights) is bit for bit the same
        assert evals[values[0], 0, s] == evals[values[1], 0, s]
        # and mode 3 starts from the same point, then its mixing weights take other steps
        assert evals[values[0], 3, s][0] == evals[values[1], 3, s][0] and evals[values[0], 3, s] != evals[values[1], 3, s]
    summary = json.load(open(tmp_path / "results" / "tiny" / "summary.json"))
    text = (tmp_path / "results" / "tiny" / "summary.md").read_text()
    assert list(summary["values"]) == list(values)
    for v in values:  # one block per value, paired within it
        assert text.count(f"\n## {v}\n") == 1
        got = summary["values"][v]["paired"]["3"]["per_seed"]
        assert got == {str(s): evals[v, 3, s][-1] - evals[v, 0, s][-1] for s in (0, 1)}
    across = summary["across_values"]
    assert across[f"0: {values[1]} − {values[0]}"]["per_seed"] == {"0": 0.0, "1": 0.0}
    assert across[f"3: {values[1]} − {values[0]}"]["per_seed"] == {
        str(s): evals[values[1], 3, s][-1] - evals[values[0], 3, s][-1] for s in (0, 1)}
    assert "## Across values" in text and text in result.stdout
    pytest.importorskip("matplotlib")
    for v in values:
        assert (tmp_path / "results" / "tiny" / v / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dataset_sweep_pairs_within_each_corpus_and_prints_the_effect_table(tmp_path):
    """Two corpora (different words): the runs of a seed share their init, each corpus its own batches, and the
    effect of mode 3 at each corpus is read from the runs' own metrics; raw losses are not compared across corpora."""
    run_tiny_sweep(tmp_path, {"code": ["def", "self", "x", "for"], "prose": ["the", "cat", "sat", "on", "a", "mat"]},
                   "--sweep", "dataset=code,prose", "--max_iters=4", "--eval_interval=2")
    final = {(v, m, s): read_records(str(tmp_path / "runs" / "tiny" / f"dataset={v}" / f"mode{m}_seed{s}"))[-1]
             for v in ("code", "prose") for m in (0, 3) for s in (0, 1)}
    summary = json.load(open(tmp_path / "results" / "tiny" / "summary.json"))
    assert summary["keys"] == ["dataset"] and summary["across_values"] is None
    for v in ("code", "prose"):
        assert final[v, 0, 0]["eval_loss"] != final[v, 0, 1]["eval_loss"]  # the seeds differ
        got = summary["effect_by_value"]["3"][f"dataset={v}"]["per_seed"]
        assert got == {str(s): final[v, 3, s]["eval_loss"] - final[v, 0, s]["eval_loss"] for s in (0, 1)}
    row = summary["interaction"]["3: dataset=prose − dataset=code"]["per_seed"]
    assert row == pytest.approx({str(s): (final["prose", 3, s]["eval_loss"] - final["prose", 0, s]["eval_loss"])
                                 - (final["code", 3, s]["eval_loss"] - final["code", 0, s]["eval_loss"]) for s in (0, 1)})
    text = (tmp_path / "results" / "tiny" / "summary.md").read_text()
    assert "## Effect by value" in text and "| 3 (mlp_learned) |" in text and "not comparable" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results" / "tiny" / "effect_by_value.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
