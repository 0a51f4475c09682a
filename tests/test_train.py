"""train.py, mostly as a subprocess on a tiny byte-level corpus and a tiny model (CPU, fp32, no compile,
except for one test). The numbers are checked against independent recomputations: the eval metrics
from the checkpoint by a plain float64 loop, resume against an uninterrupted run bit for bit, DDP
against one process with the same global batch."""
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import prepare
from harness import checkpoint, configurator, shards
import model as model_lib
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
MAX_ITERS = 150
EVAL_INTERVAL = 50
EVAL_WINDOWS = 4 * 8  # eval_iters * batch_size
MODES = list(range(len(model_lib.MODES)))  # every mode, a new one included


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny corpus of made-up sentences, byte tokenizer, train split in several small shards so that
    windows run across shard boundaries."""
    root = tmp_path_factory.mktemp("train_data")
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat box red blue big small and then quickly slowly".split()
    (root / "src").mkdir()
    for d in range(60):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(40)]
        (root / "src" / f"doc{d:02d}.txt").write_text("\n".join(sentences) + "\n")
    prepare.prepare([str(root / "src")], name="tiny", tokenizer="byte", data_dir=str(root), val_fraction=0.2,
                    shard_tokens=20_000, workers=1, quiet=True)
    return str(root)


def tiny_args(data_dir, out_dir, *extra):
    return ["--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=3", "--n_head=2",
            "--n_embd=32", "--mlp_hidden=128", "--block_size=32", "--batch_size=8",
            "--gradient_accumulation_steps=1", "--max_epochs=0", f"--max_iters={MAX_ITERS}", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=10",
            f"--eval_interval={EVAL_INTERVAL}", "--eval_iters=4", "--log_interval=1", "--ckpt_interval=100",
            "--compile=false", "--dtype=float32", "--device=cpu", "--seed=7", *extra]


def env():
    # one thread: the same float summation order in every run, and no fight over the two CI cores
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def command(args):
    return [sys.executable, TRAIN, *args]


def run_train(args, expect_ok=True, timeout=300):
    result = subprocess.run(command(args), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def run_in_pairs(arg_lists):
    """train.py on each argument list, two at a time (CI has two cores) -> their stdouts, in order."""
    stdouts = []
    for i in range(0, len(arg_lists), 2):
        procs = [subprocess.Popen(command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env(), cwd=ROOT) for args in arg_lists[i:i + 2]]
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
            stdouts.append(stdout)
    return stdouts


def records(out_dir, kind=None):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if kind is None or r["type"] == kind]


# the tests that read the every-mode runs: under pytest -n, one worker builds them, not each worker
EVERY_MODE_RUNS = pytest.mark.xdist_group("every_mode_runs")  # pytest.ini: --dist loadgroup


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """One finished run per residual mode (two at a time: CI has two cores) -> {mode: (out_dir, stdout)}."""
    root = tmp_path_factory.mktemp("runs")
    outs = [str(root / f"mode{mode}") for mode in MODES]
    stdouts = run_in_pairs([tiny_args(data_dir, out, f"--residual_mode={mode}") for mode, out in zip(MODES, outs)])
    return {mode: (out, stdout) for mode, out, stdout in zip(MODES, outs, stdouts)}


# ----------------------------------------------------------------------------- learning and metrics

@EVERY_MODE_RUNS
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_lowers_the_val_loss(runs, mode):
    evals = records(runs[mode][0], "eval")
    assert [r["iter"] for r in evals] == list(range(0, MAX_ITERS + 1, EVAL_INTERVAL))
    first, last = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    assert first > math.log(257) - 0.5  # untrained: about uniform over the bytes
    assert last < first - 1.5, (first, last)
    assert evals[-1]["eval_accuracy"] > evals[0]["eval_accuracy"] + 0.2


EVAL_KEYS = {"type", "iter", "epoch", "tokens", "eval_loss", "eval_perplexity", "eval_accuracy", "eval_runtime",
             "eval_samples", "eval_samples_per_second", "eval_steps_per_second"}
TRAIN_KEYS = {"type", "iter", "epoch", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "elapsed", "eta"}


@EVERY_MODE_RUNS
def test_metrics_block_and_jsonl_carry_every_field(runs, data_dir):
    out, stdout = runs[3]
    recs = records(out)
    assert recs[0]["type"] == "start" and recs[-1]["type"] == "done"
    evals, trains = [r for r in recs if r["type"] == "eval"], [r for r in recs if r["type"] == "train"]
    for r in evals:
        assert set(r) == EVAL_KEYS
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
        assert r["eval_samples"] == EVAL_WINDOWS
        assert r["tokens"] == r["iter"] * 8 * 32
        assert r["eval_samples_per_second"] == pytest.approx(EVAL_WINDOWS / r["eval_runtime"], rel=1e-9)
        assert r["eval_steps_per_second"] == pytest.approx(4 / r["eval_runtime"], rel=1e-9)
    assert [r["iter"] for r in trains] == list(range(1, MAX_ITERS + 1))
    for r in trains:
        assert set(r) == TRAIN_KEYS
        assert all(r[k] is not None and math.isfinite(r[k]) for k in TRAIN_KEYS - {"type"})
        assert 0 < r["mfu"] < 1
    train_windows = (shards.read_meta(os.path.join(data_dir, "tiny"))["splits"]["train"]["tokens"] - 1) // 32
    assert trains[-1]["epoch"] == pytest.approx(MAX_ITERS * 8 / train_windows)
    assert recs[0]["unigram_entropy"] > 1.0
    done = recs[-1]
    assert done["iter"] == MAX_ITERS and done["eval_loss"] == evals[-1]["eval_loss"] and done["peak_memory_bytes"] > 0
    # the printed block, as the original experiment printed it
    block = stdout.split(f"***** eval metrics (iter {MAX_ITERS}) *****")[1]
    for key in ["epoch", "eval_accuracy", "eval_loss", "eval_perplexity", "eval_runtime", "eval_samples",
                "eval_samples_per_second", "eval_steps_per_second"]:
        assert f"  {key} " in block
    assert re.search(rf"\n  eval_loss +=  +{evals[-1]['eval_loss']:.4f}\n", block)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["residual_mode"] == 3 and config["max_iters"] == MAX_ITERS and config["dtype"] == "float32"


def reference_eval(out, data_dir):
    """The final model's eval loss and accuracy, recomputed from its checkpoint by a plain float64 loop:
    the evenly spaced validation windows, log-softmax, argmax."""
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"])).double().eval()
    model.load_state_dict(ckpt["model"])
    path = os.path.join(data_dir, "tiny")
    tokens = np.concatenate(shards.open_split(path, "val")).astype(np.int64)
    n_windows = (len(tokens) - 1) // 32
    starts = np.round(np.linspace(0, n_windows - 1, EVAL_WINDOWS)).astype(np.int64) * 32
    x = torch.from_numpy(np.stack([tokens[s:s + 32] for s in starts]))
    y = torch.from_numpy(np.stack([tokens[s + 1:s + 33] for s in starts]))
    with torch.no_grad():
        logits, _ = model(x)
    logp = torch.log_softmax(logits, dim=-1)
    loss = -logp.gather(-1, y.unsqueeze(-1)).mean().item()
    accuracy = (logits.argmax(-1) == y).double().mean().item()
    return loss, accuracy


@EVERY_MODE_RUNS
def test_eval_metrics_match_an_independent_recomputation_from_the_checkpoint(runs, data_dir):
    out, _ = runs[3]
    loss, accuracy = reference_eval(out, data_dir)
    final = records(out, "eval")[-1]
    assert final["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert final["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)


@EVERY_MODE_RUNS
def test_checkpoint_contract(runs):
    out, _ = runs[3]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION and ckpt["done"] is True
    assert ckpt["iter_num"] == MAX_ITERS and ckpt["data_pos"] == MAX_ITERS * 8
    assert ckpt["model_args"] == {"n_layer": 3, "n_head": 2, "n_embd": 32, "mlp_hidden": 128, "block_size": 32,
                                  "dropout": 0.0, "bias": True, "residual_mode": 3, "current_logit": 0.0,
                                  "norm_eps": 1e-5, "hc_streams": 4, "mhc_iters": 20, "vocab_size": 320}
    assert ckpt["tokenizer"] == {"name": "byte", "vocab_size": 257, "eot_token": 256}
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["config"]["seed"] == 7 and ckpt["scaler"] is None
    assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    assert isinstance(ckpt["ranks"][0]["cpu"], torch.Tensor) and ckpt["window_iters"] == 0


@EVERY_MODE_RUNS
def test_layer_weights_files(runs):
    out, stdout = runs[3]
    doc = json.load(open(os.path.join(out, "layer_weights.json")))
    assert set(doc) == {"saved_at", "config", "layers"}
    assert doc["config"] == {"n_layer": 3, "n_embd": 32, "n_head": 2, "mlp_hidden": 128, "residual_mode": 3}
    assert doc["layers"][0] == {"index": 0, "count": 0, "raw": None, "normalized": None}
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    for m, layer in enumerate(doc["layers"][1:], start=1):
        assert layer["index"] == m and layer["count"] == m + 1
        assert len(layer["raw"]) == len(layer["normalized"]) == m + 1
        assert sum(layer["normalized"]) == pytest.approx(1.0, abs=1e-6)
        theta = ckpt["model"][f"transformer.h.{m}.layer_logits"].double()
        assert layer["raw"] == pytest.approx(theta.tolist(), abs=0)
        e = np.exp(np.array(layer["raw"]) - max(layer["raw"]))
        assert layer["normalized"] == pytest.approx((e / e.sum()).tolist(), abs=1e-6)
        assert layer["raw"] != [0.0] * (m + 1)  # they were trained
    original = os.path.join(ROOT, "..", "shared", "original-experiment", "method3_v2_layer_weights.json")
    if os.path.exists(original):  # the same shape as the original experiment's file
        theirs = json.load(open(original))
        assert set(theirs["config"]) <= set(doc["config"]) and set(theirs) - {"what"} == set(doc)
        assert [set(layer) for layer in theirs["layers"][:3]] == [set(layer) for layer in doc["layers"]]
        assert theirs["layers"][0] == doc["layers"][0]
    text = open(os.path.join(out, "layer_weights.txt")).read()
    assert "Layer 0 (index 0): no weight parameters" in text and "Layer 2 (index 2): 3 weight parameters" in text
    assert f"normalized weights: {doc['layers'][2]['normalized']}" in text
    with open(os.path.join(out, "layer_weights.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # printed at every eval: block 2's three weights, aligned
    last = stdout.rsplit("softmax(theta_m) over blocks 0..m", 1)[1]
    assert "  block  2: " + " ".join(f"{w:.3f}" for w in doc["layers"][2]["normalized"]) in last
    # a mode without learned weights: nulls everywhere, no plot
    plain = json.load(open(os.path.join(runs[0][0], "layer_weights.json")))
    assert all(layer["count"] == 0 and layer["raw"] is None for layer in plain["layers"])
    assert not os.path.exists(os.path.join(runs[0][0], "layer_weights.png"))
    assert "layer weights" not in runs[0][1]


@EVERY_MODE_RUNS
@pytest.mark.parametrize("mode", [4, 5, 6, 7])
def test_mixing_files_of_the_new_modes(runs, mode):
    """Every mixing parameter is in layer_weights.json as trained (raw, read back from the checkpoint),
    with the rows a heatmap shows, and printed at each eval; mode 6's rows are its routing weights."""
    out, stdout = runs[mode]
    layers = json.load(open(os.path.join(out, "layer_weights.json")))["layers"]
    state = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)["model"]
    if mode == 6:  # 2L + 1 rows: z_k over s_0..s_k, the mean softmax over the eval windows
        names = [f"transformer.h.{k // 2}.{'mlp' if k % 2 else 'attn'}_query" for k in range(6)] + ["final_query"]
        assert [r["count"] for r in layers] == list(range(1, 2 * 3 + 2))  # z_0..z_6 of 3 blocks
        assert all(sum(r["normalized"]) == pytest.approx(1.0, abs=1e-5) for r in layers)
        assert layers[6]["normalized"] != pytest.approx([1 / 7] * 7, abs=1e-4)  # routing was learned
    else:
        key = {4: "layer_logits", 5: "dwa_weights", 7: "x0_lambdas"}[mode]
        names = [f"transformer.h.{m}.{key}" for m in range(3)]
        counts = {4: [0, 2, 3], 5: [2, 3, 4], 7: [2, 2, 2]}[mode]
        assert [r["count"] for r in layers] == counts
    for row, name in zip(layers, names):
        if name in state:
            assert row["raw"] == pytest.approx(state[name].double().tolist(), abs=0)
        else:  # mode 4's block 0: its only weight is 1
            assert row["raw"] is None and mode == 4
    assert ("z  6: " if mode == 6 else "block  2: ") in stdout.rsplit("***** eval metrics", 1)[1]
    with open(os.path.join(out, "layer_weights.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- determinism and resume

@EVERY_MODE_RUNS
def test_same_seed_gives_identical_eval_numbers(runs, data_dir, tmp_path):
    out = str(tmp_path / "again")
    run_train(tiny_args(data_dir, out, "--residual_mode=3"))
    strip = lambda recs: [{k: v for k, v in r.items() if "runtime" not in k and "per_second" not in k} for r in recs]
    assert strip(records(out, "eval")) == strip(records(runs[3][0], "eval"))


@EVERY_MODE_RUNS
def test_sigterm_then_resume_reaches_exactly_the_same_losses(runs, data_dir, tmp_path):
    out = str(tmp_path / "interrupted")
    args = tiny_args(data_dir, out, "--residual_mode=3")
    proc = subprocess.Popen(command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(), cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, rest
    assert "Resume with: python train.py" in rest and "--init_from=resume" in rest
    stopped_at = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"]
    assert 3 <= stopped_at < MAX_ITERS
    assert records(out, "train")[-1]["iter"] == stopped_at  # the step finished, then the checkpoint

    run_train(args + ["--init_from=resume"])
    reference = records(runs[3][0])
    resumed = records(out)
    for kind, keys in (("train", ["iter", "loss", "grad_norm", "lr", "epoch", "tokens"]),
                       ("eval", ["iter", "eval_loss", "eval_accuracy"])):
        ref = [[r[k] for k in keys] for r in reference if r["type"] == kind]
        got = [[r[k] for k in keys] for r in resumed if r["type"] == kind]
        assert got == ref  # bitwise: floats round-trip exactly through JSON
    a = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(runs[3][0], "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_torchrun_two_processes_match_one_process(data_dir, tmp_path):
    """gloo on CPU: 2 ranks x 1 micro-step against 1 process x 2 micro-steps, the same global batch.
    The budget is in epochs here."""
    common = ["--gradient_accumulation_steps=2", "--max_epochs=0.05", "--eval_interval=5", "--residual_mode=3"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    run_train(tiny_args(data_dir, single, *common))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             TRAIN, *tiny_args(data_dir, ddp, *common)],
                            capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "DDP x2" in result.stdout
    train_windows = (shards.read_meta(os.path.join(data_dir, "tiny"))["splits"]["train"]["tokens"] - 1) // 32
    expected_iters = math.ceil(0.05 * train_windows / 16)
    for out in (single, ddp):
        assert json.load(open(os.path.join(out, "config.json")))["max_iters"] == expected_iters
    one, two = records(single, "train"), records(ddp, "train")
    assert [r["iter"] for r in two] == list(range(1, expected_iters + 1))  # rank 0 alone writes
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert [r["eval_loss"] for r in records(ddp, "eval")] == pytest.approx(
        [r["eval_loss"] for r in records(single, "eval")], rel=1e-4)


def test_compiled_run(data_dir, tmp_path):
    """The one compiled run (2 blocks: compiling costs CI time): it trains, and its eval agrees with an
    eager float64 recomputation from its checkpoint."""
    out = str(tmp_path / "compiled")
    result = run_train(tiny_args(data_dir, out, "--residual_mode=3", "--n_layer=2", "--compile=true",
                                 "--max_iters=3", "--eval_interval=3"))
    if any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):  # inductor on CPU needs one
        assert "compile on" in result.stdout and "unavailable" not in result.stdout
    else:
        assert "torch.compile is unavailable here" in result.stdout
    final = records(out, "eval")[-1]
    loss, accuracy = reference_eval(out, data_dir)
    assert final["iter"] == 3 and final["eval_loss"] == pytest.approx(loss, rel=1e-4)


def test_compile_falls_back_to_eager_with_a_message(data_dir, tmp_path):
    """No working C++ compiler (and an empty compile cache): one line of notice, then an eager run."""
    out = str(tmp_path / "fallback")
    args = tiny_args(data_dir, out, "--residual_mode=3", "--n_layer=2", "--compile=true", "--max_iters=3",
                     "--eval_interval=3")
    result = subprocess.run(command(args), capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(env(), CXX="/bin/false", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr[-3000:]
    notice = [line for line in result.stdout.splitlines() if "torch.compile is unavailable here" in line]
    assert len(notice) == 1 and "training without it" in notice[0]
    assert "compile off" in result.stdout and records(out, "done")


# ----------------------------------------------------------------------------- errors

def load(argv):
    return configurator.load(argv, configurator.defaults(TRAIN), parsers={"residual_mode": model_lib.parse_residual_mode})


def test_config_parsing(tmp_path):
    cfg = load(["--learning_rate=1", "--compile=false", "--bias=True", "--out_dir=runs/a=b",
                             "--residual_mode=mlp_learned", "--max_epochs=2"])
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["compile"] is False and cfg["bias"] is True
    assert cfg["out_dir"] == "runs/a=b" and cfg["residual_mode"] == 3 and cfg["max_epochs"] == 2.0
    # files in order, then flags; a file sees the config so far
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import math\nn_layer = 4\nout_dir = 'out/x'\nlearning_rate = 2  # an int for a float\n")
    b.write_text("out_dir = out_dir + '_cpu'\nn_layer = 6\n")
    cfg = load([str(a), str(b), "--n_layer=8"])
    assert (cfg["n_layer"], cfg["out_dir"], cfg["learning_rate"]) == (8, "out/x_cpu", 2.0)
    bad = [(["--learnig_rate=1"], "unknown config key 'learnig_rate'.*did you mean 'learning_rate'"),
           (["--batch_size=abc"], "--batch_size=abc: expected an integer"),
           (["--compile=yes"], "--compile=yes: expected true or false"),
           (["--batch_size=1.5"], "expected an integer"),
           ([f"--residual_mode={len(MODES)}"], f"unknown residual_mode {len(MODES)}"),
           (["--layer_weight_lr_mult=3"], "now called mixing_lr_mult"),
           (["--n_layer"], "needs a value"),
           ([str(tmp_path / "nope.py")], "not found")]
    for argv, message in bad:
        with pytest.raises(configurator.ConfigError, match=message):
            load(argv)
    c = tmp_path / "c.py"
    c.write_text("n_layers = 6\n")
    with pytest.raises(configurator.ConfigError, match="unknown config key 'n_layers'.*did you mean 'n_layer'"):
        load([str(c)])
    c.write_text("batch_size = 'eight'\n")
    with pytest.raises(configurator.ConfigError, match="sets batch_size = 'eight': expected an integer"):
        load([str(c)])
    c.write_text("n_layer = = 3\n")
    with pytest.raises(configurator.ConfigError, match="c.py:1"):
        load([str(c)])
    with pytest.raises(configurator.ConfigError, match="init_from must be"):
        configurator.check_train(load(["--init_from=gpt2"]))
    with pytest.raises(configurator.ConfigError, match="dtype must be"):
        configurator.check_train(load(["--dtype=fp8"]))
    # dtype auto is decided per device; an explicit one always wins
    assert configurator.resolve_dtype("auto", "mps") == "float32" and configurator.resolve_dtype("float16", "cpu") == "float16"
    assert configurator.resolve_dtype("auto", "cpu") == ("bfloat16" if configurator.cpu_has_native_bf16() else "float32")
    if not torch.cuda.is_available():
        with pytest.raises(configurator.ConfigError, match="sees no CUDA GPU"):
            configurator.resolve_device("cuda")


def test_the_defaults_keep_the_notes_32_windows_and_divide_among_1_to_8_processes(monkeypatch):
    """torchrun --nproc_per_node=8 train.py configs/method3.py must start: the micro-steps divide."""
    defaults = load([])
    assert defaults["batch_size"] * defaults["gradient_accumulation_steps"] == 32
    for processes in (1, 2, 4, 8):
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        configurator.check_train(defaults)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(configurator.ConfigError, match="must be a multiple of the number of processes"):
        configurator.check_train(defaults)


@EVERY_MODE_RUNS
def test_script_errors_are_one_line(runs, data_dir, tmp_path):
    """A config error, a corrupt checkpoint and a missing dataset, through the script: exit status 1 and
    one line on stderr that names the problem and the fix, no traceback."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(open(os.path.join(runs[3][0], "ckpt.pt"), "rb").read()[:5000])  # truncated
    cases = [
        (tiny_args(data_dir, tmp_path / "x", "--n_layr=2"), "unknown config key 'n_layr' in --n_layr=2; did you mean 'n_layer'?"),
        (tiny_args(data_dir, corrupt, "--init_from=resume", "--residual_mode=3"), "cannot read checkpoint"),
        (tiny_args(tmp_path / "nodata", tmp_path / "z", "--dataset=mycorpus"),
         "no such dataset folder; prepare it with `python prepare.py"),
    ]
    for args, message in cases:
        result = run_train([str(a) for a in args], expect_ok=False)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: ") and message in lines[0], result.stderr


@EVERY_MODE_RUNS
def test_checkpoint_mismatches(runs, data_dir, tmp_path):
    """The checkpoint must fit the config: one line each, before any training."""
    good = runs[3][0]
    cases = [
        (tiny_args(data_dir, good, "--init_from=resume", "--residual_mode=1"),
         "does not match the config: residual_mode=3 in the checkpoint but 1 in the config"),
        (tiny_args(data_dir, good, "--init_from=resume", "--residual_mode=3", "--n_embd=64"),
         "n_embd=32 in the checkpoint but 64 in the config"),
        (tiny_args(data_dir, good, "--residual_mode=3"), "exists; continue it with --init_from=resume"),
        (tiny_args(data_dir, tmp_path / "y", "--init_from=resume"), "no checkpoint at"),
    ]
    for args, message in cases:
        result = run_train([str(a) for a in args], expect_ok=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_builtin_corpus_is_prepared_on_first_use(tmp_path):
    out = str(tmp_path / "out")
    result = run_train(["--dataset=pystdlib_byte", f"--data_dir={tmp_path}", f"--out_dir={out}", "--n_layer=1",
                        "--n_head=1", "--n_embd=16", "--mlp_hidden=64", "--block_size=16", "--batch_size=2",
                        "--max_epochs=0", "--max_iters=1",
                        "--eval_iters=1", "--compile=false", "--dtype=float32", "--device=cpu"])
    assert "dataset 'pystdlib_byte' is not prepared yet; preparing it" in result.stdout
    assert shards.read_meta(str(tmp_path / "pystdlib_byte"))["tokenizer"] == "byte"
    assert records(out, "done")


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "nan")
    result = run_train(tiny_args(data_dir, out, "--learning_rate=1e20", "--warmup_iters=0", "--grad_clip=0",
                                 "--ckpt_interval=1", "--max_iters=20"), expect_ok=False)
    assert result.returncode == 1
    assert "became nan/inf by iter" in result.stderr and "the last checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not any(math.isnan(r["loss"]) for r in records(out, "train") if r["iter"] <= ckpt["iter_num"])


# ----------------------------------------------------------------------------- resume, as the review found it

TIMING = {"tokens_per_sec", "mfu", "elapsed", "eta", "eval_runtime", "eval_samples_per_second",
          "eval_steps_per_second"}


def untimed(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs if r["type"] in ("train", "eval")]


def test_resume_is_bit_exact_in_every_mode_with_dropout_and_a_log_window_cut_in_two(data_dir, tmp_path):
    """Dropout draws from the global RNG, so nothing that measures or reports may touch it (the CPU's
    matmul peak once did); and a log window cut by the checkpoint (log_interval 4, saved at iter 6)
    must still log the same mean loss. 12 iterations against 6 + 6, in every mode."""
    common = ["--dropout=0.1", "--log_interval=4", "--lr_decay_iters=12", "--eval_interval=6", "--ckpt_interval=6",
              "--n_layer=2"]
    runs = {m: (str(tmp_path / f"whole{m}"), str(tmp_path / f"split{m}")) for m in MODES}
    run_in_pairs([tiny_args(data_dir, out, *common, f"--residual_mode={m}", f"--max_iters={n}")
                  for m in MODES for out, n in zip(runs[m], (12, 6))])
    run_in_pairs([tiny_args(data_dir, runs[m][1], *common, f"--residual_mode={m}", "--max_iters=12",
                            "--init_from=resume") for m in MODES])
    for m, (whole, split) in runs.items():
        assert [r["iter"] for r in records(split, "train")] == [4, 8, 12]  # 5, 6 were in the checkpoint
        assert untimed(records(split)) == untimed(records(whole)), m  # bitwise: floats round-trip via JSON
        a = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["model"]
        b = torch.load(os.path.join(whole, "ckpt.pt"), weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in b), m


def test_resume_applies_the_new_optimizer_settings_and_says_so(data_dir, tmp_path):
    out = str(tmp_path / "run")
    run_train(tiny_args(data_dir, out, "--max_iters=3", "--mixing_lr_mult=1", "--residual_mode=3"))
    result = run_train(tiny_args(data_dir, out, "--max_iters=5", "--init_from=resume", "--residual_mode=3",
                                 "--weight_decay=0.0", "--beta2=0.9", "--mixing_lr_mult=10"))
    assert "weight_decay 0.1 -> 0.0" in result.stdout and "mixing_lr_mult 1.0 -> 10.0" in result.stdout
    groups = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.9) for g in groups)
    assert [g["lr_mult"] for g in groups] == [1.0, 1.0, 10.0]
    lr = records(out, "train")[-1]["lr"]
    assert groups[2]["lr"] == pytest.approx(10 * lr) and groups[0]["lr"] == pytest.approx(lr)


def test_a_run_killed_before_its_report_is_finished_by_resume_and_can_be_extended(data_dir, tmp_path):
    """Killed after the final checkpoint but before the 'done' record: resume writes the report. Then
    --max_iters=10 extends the run at min_lr: the cosine decay keeps its length, no jump back up."""
    out = str(tmp_path / "run")
    run_train(tiny_args(data_dir, out, "--max_iters=6", "--residual_mode=3", "--warmup_iters=2"))
    kept = [line for line in open(os.path.join(out, "metrics.jsonl")) if '"type": "done"' not in line]
    open(os.path.join(out, "metrics.jsonl"), "w").writelines(kept)
    for ext in ("json", "txt", "png"):
        os.remove(os.path.join(out, f"layer_weights.{ext}"))
    run_train(tiny_args(data_dir, out, "--max_iters=6", "--residual_mode=3", "--warmup_iters=2",
                        "--init_from=resume"))
    assert records(out, "done")[0]["iter"] == 6 and os.path.exists(os.path.join(out, "layer_weights.png"))
    assert [r["iter"] for r in records(out, "eval")] == [0, 6]  # nothing evaluated twice

    run_train(tiny_args(data_dir, out, "--max_iters=10", "--residual_mode=3", "--warmup_iters=2",
                        "--init_from=resume"))
    lrs = {r["iter"]: r["lr"] for r in records(out, "train")}  # the lr of the step that ended at iter
    assert lrs[6] > 3e-4 and [lrs[i] for i in range(7, 11)] == [3e-4] * 4  # min_lr from the old end on
    assert json.load(open(os.path.join(out, "config.json")))["lr_decay_iters"] == 6
    assert [r["iter"] for r in records(out, "done")] == [10]


def test_ddp_ranks_that_see_the_dataset_differently_still_meet(tmp_path):
    """Rank 1 is made to see the built-in dataset as present while rank 0 prepares it: each rank once
    decided on its own whether to wait at the barrier, and the ranks met in different collectives."""
    wrapper = tmp_path / "rank1_sees_data.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "if os.environ['RANK'] == '1':\n"
        "    real = os.path.exists\n"
        "    os.path.exists = lambda p: True if str(p).endswith('pystdlib_byte') else real(p)\n"
        f"sys.argv[0] = {TRAIN!r}\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        f"runpy.run_path({TRAIN!r}, run_name='__main__')\n")
    out = str(tmp_path / "out")
    args = ["--dataset=pystdlib_byte", f"--data_dir={tmp_path}", f"--out_dir={out}", "--n_layer=1", "--n_head=1",
            "--n_embd=16", "--mlp_hidden=64", "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=2",
            "--max_iters=2", "--max_epochs=0", "--eval_iters=1", "--compile=false", "--dtype=float32",
            "--device=cpu"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(wrapper), *args], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "DDP x2" in result.stdout and records(out, "done")


# ----------------------------------------------------------------------------- a new model option

def with_a_gelu_option(root):
    """A copy of the code with one new model option, made as the README's Hacking section says: a
    GPTConfig field with its check (model.py) and a global of the same name (train.py), nothing else."""
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("tests", "docs", ".git", "data", "out*", "runs",
                                                              "results", "__pycache__"))
    model_py, train_py = os.path.join(root, "model.py"), os.path.join(root, "train.py")
    source = open(model_py).read()
    edits = [("    bias: bool = True", "    gelu: str = \"tanh\"\n    bias: bool = True"),
             ("    def __post_init__(self):\n", "    def __post_init__(self):\n        if self.gelu not in (\"tanh\", \"none\"):\n"
              "            raise ValueError(f\"gelu must be tanh or none, got {self.gelu!r}\")\n"),
             ('nn.GELU(approximate="tanh")', "nn.GELU(approximate=config.gelu)")]
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    open(model_py, "w").write(source)
    source = open(train_py).read()
    source = source.replace("dropout = 0.0\n", "dropout = 0.0\ngelu = \"tanh\"  # GPT-2's tanh GELU, or none: the exact one\n", 1)
    open(train_py, "w").write(source)
    return os.path.join(root, "train.py")


def test_a_new_model_option_is_one_field_and_one_global(data_dir, tmp_path):
    patched = with_a_gelu_option(str(tmp_path / "code"))
    old = str(tmp_path / "old")
    run_train(tiny_args(data_dir, old, "--max_iters=4", "--residual_mode=3"))  # today's code: no gelu field
    # a checkpoint saved without the field resumes with the field's default, not reported as a change
    resumed = subprocess.run([sys.executable, patched, *tiny_args(data_dir, old, "--max_iters=6", "--residual_mode=3",
                                                                  "--init_from=resume")],
                             capture_output=True, text=True, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "gelu" not in resumed.stdout
    assert torch.load(os.path.join(old, "ckpt.pt"), weights_only=True)["model_args"]["gelu"] == "tanh"
    # --gelu=none reaches the model and the checkpoint's model_args
    runs = {}
    for gelu in ("tanh", "none"):
        runs[gelu] = str(tmp_path / gelu)
        result = subprocess.run([sys.executable, patched, *tiny_args(data_dir, runs[gelu], "--max_iters=2",
                                                                     f"--gelu={gelu}")],
                                capture_output=True, text=True, env=env(), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(os.path.join(runs["none"], "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"]["gelu"] == "none"
    first = {g: records(out, "eval")[0]["eval_loss"] for g, out in runs.items()}  # the same init, another GELU
    assert first["none"] != first["tanh"]
    # a bad value: one line, no traceback, before any data is read (this dataset does not exist)
    bad = subprocess.run([sys.executable, patched, *tiny_args(str(tmp_path / "no_data"), str(tmp_path / "bad"),
                                                              "--gelu=erf")],
                         capture_output=True, text=True, env=env(), timeout=300)
    assert bad.returncode == 1 and bad.stderr == "train.py: gelu must be tanh or none, got 'erf'\n", bad.stderr
