"""
Faults, tested the way a database tests durability: train.py, prepare.py and compare.py killed with
SIGKILL at random moments (a fixed seed chooses the moments, so a failure replays), writes that fail
on a full disk (RLIMIT_FSIZE in the child), a checkpoint corrupted on disk, and a catalogue of bad
inputs, each of which must end in one line that names the problem and the fix, with nothing on disk
changed. docs/faults.md lists the catalogue.
"""
import glob
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import prepare
from harness import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_SEED = 20261129  # the kill moments; change it to try others, keep it to replay a failure
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TIMING = {"tokens_per_sec", "mfu", "elapsed", "eta", "eval_runtime", "eval_samples_per_second",
          "eval_steps_per_second"}


def script(name, *args):
    return [sys.executable, os.path.join(ROOT, name), *args]


def write_corpus(folder, seed, documents=30, words=300):
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    vocab = "def class self return for in if else import from while with as yield".split()
    for d in range(documents):
        with open(os.path.join(folder, f"doc{d:03d}.py"), "w") as f:
            f.write(" ".join(rng.choice(vocab) for _ in range(words)) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_data")
    write_corpus(str(root / "src"), 0)
    prepare.prepare([str(root / "src")], name="tiny", tokenizer="byte", data_dir=str(root), val_fraction=0.2,
                    shard_tokens=20_000, workers=1, quiet=True)
    return str(root)


def tiny(data_dir, out, *extra):
    """A small run with a checkpoint at every iteration (many chances to die inside a write), dropout
    (the random state must survive) and a log window of 3 (cut by every checkpoint)."""
    return script("train.py", "--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out}", "--n_layer=2",
                  "--n_head=2", "--n_embd=32", "--mlp_hidden=64", "--block_size=32", "--batch_size=4",
                  "--max_epochs=0", "--max_iters=48", "--warmup_iters=2", "--eval_interval=12", "--eval_iters=2",
                  "--log_interval=3", "--ckpt_interval=1", "--residual_mode=3", "--dropout=0.1", "--compile=false",
                  "--dtype=float32", "--device=cpu", "--peak_flops=1e12", "--seed=5", *extra)


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def untimed(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs if r["type"] in ("train", "eval")]


def temporaries(folder):
    return glob.glob(os.path.join(folder, "*.tmp[0-9]*")) + glob.glob(os.path.join(folder, ".*.tmp-*"))


def snapshot(root):
    """{path: sha256} of every file under root: what "nothing on disk changed" compares."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def started(path, before, proc, timeout=60):
    """Waits until the child has rewritten path (its mtime moved): it is past its imports."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(path) and os.stat(path).st_mtime_ns != before:
            return True
        time.sleep(0.005)
    return proc.poll() is None


def mtime(path):
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


# ----------------------------------------------------------------------------- kill -9: train.py

# train.py with torch.save writing each checkpoint in two halves 20 ms apart (tests only): a kill
# then often lands inside a write, half a file written, where an unprotected save would tear ckpt.pt
SLOW_SAVES = """
import io, runpy, sys, time, torch
save = torch.save
def save_in_two_halves(obj, f):
    buffer = io.BytesIO()
    save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    time.sleep(0.02)
    f.write(data[len(data) // 2:])
torch.save = save_in_two_halves
sys.argv = sys.argv[1:]
sys.path.insert(0, {root!r})
runpy.run_path(sys.argv[0], run_name="__main__")
"""

def test_train_killed_at_random_moments_resumes_to_the_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    subprocess.run(tiny(data_dir, whole), env=ENV, check=True, capture_output=True, timeout=120)
    slow = tmp_path / "slow_saves.py"
    slow.write_text(SLOW_SAVES.format(root=ROOT))
    rng, kills, inside, torn = random.Random(KILL_SEED), 0, 0, 0
    metrics = os.path.join(cut, "metrics.jsonl")
    for attempt in range(40):
        resume = ["--init_from=resume"] if os.path.exists(os.path.join(cut, "ckpt.pt")) else []
        before = mtime(metrics)
        proc = subprocess.Popen([sys.executable, str(slow), *tiny(data_dir, cut, *resume)[1:]], env=ENV,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if kills < 12 and started(metrics, before, proc):
            time.sleep(rng.uniform(0, 0.3))
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                inside += bool(temporaries(cut))  # a write was under way: its temporary file is left
                lines = open(metrics).read().split("\n")
                bad = [i for i, line in enumerate(lines) if line and not line.startswith("{")]
                bad += [i for i, line in enumerate(lines[:-1]) if line and not line.endswith("}")]
                assert not bad or set(bad) == {len(lines) - 1}, "only a torn last line may be lost"
                torn += bool(bad)
                continue
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        if records(cut)[-1]["type"] == "done":
            break
    print(f"\nkill -9 train.py: {kills} kills, {inside} inside a write, {torn} torn last lines; "
          f"{attempt + 1} starts in all")
    assert kills >= 8 and inside >= 1, (kills, inside)  # the moments really covered writes
    assert untimed(records(cut)) == untimed(records(whole))  # every logged value, bit for bit
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (cut, whole))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    state = ("optimizer", "ranks", "iter_num", "data_pos", "window_iters")  # moments, random states, ...
    assert checkpoint.digest([a[k] for k in state]).digest() == checkpoint.digest([b[k] for k in state]).digest()
    layers = [json.load(open(os.path.join(d, "layer_weights.json")))["layers"] for d in (cut, whole)]
    assert layers[0] == layers[1]
    assert not temporaries(cut)  # a resumed run clears what a killed write left


# ----------------------------------------------------------------------------- kill -9: prepare.py

def test_prepare_killed_at_random_moments_leaves_the_old_dataset_or_the_complete_new_one(tmp_path):
    old_src, new_src, data = str(tmp_path / "old"), str(tmp_path / "new"), str(tmp_path / "data")
    write_corpus(old_src, 1, documents=40)
    write_corpus(new_src, 2, documents=200, words=2000)
    common = ["--name=d", "--tokenizer=byte", "--workers=1", "--shard-tokens=50000", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(script("prepare.py", new_src, f"--data-dir={tmp_path / 'ref'}", *common), check=True)
    duration, new = time.perf_counter() - t0, snapshot(str(tmp_path / "ref" / "d"))
    subprocess.run(script("prepare.py", old_src, f"--data-dir={tmp_path / 'old_copy'}", *common), check=True)
    old = snapshot(str(tmp_path / "old_copy" / "d"))
    rng, states, inside = random.Random(KILL_SEED), [], 0
    for trial in range(24):  # 8 kills at least, and more until one lands inside the writing, which is
        if trial >= 8 and inside:  # short: under load all 8 seeded moments can miss it
            break
        shutil.rmtree(os.path.join(data, "d"), ignore_errors=True)  # every trial replaces the old one
        shutil.copytree(str(tmp_path / "old_copy" / "d"), os.path.join(data, "d"))
        proc = subprocess.Popen(script("prepare.py", new_src, f"--data-dir={data}", "--overwrite", *common))
        time.sleep(rng.uniform(0.2, 1.0) * duration)
        proc.kill()
        proc.wait()
        inside += bool(glob.glob(os.path.join(data, ".d.tmp-*")))  # killed while writing shards
        now = snapshot(os.path.join(data, "d"))
        assert now in (old, new), f"trial {trial}: a half dataset"
        states.append("old" if now == old else "new")
    print(f"\nkill -9 prepare.py: {inside} of {len(states)} kills inside the writing; the dataset was then "
          f"{states}")
    assert inside >= 1  # the moments really covered writes
    subprocess.run(script("prepare.py", new_src, f"--data-dir={data}", "--overwrite", *common), check=True)
    assert snapshot(os.path.join(data, "d")) == new and os.listdir(data) == ["d"]  # no temporaries left


def test_a_kill_between_the_two_renames_of_overwrite_is_repaired_by_the_next_prepare(tmp_path):
    """--overwrite moves the old dataset aside, then the new one in: a kill between the two leaves no
    dataset at its path. The next prepare.py puts the old one back before it starts."""
    src, data = str(tmp_path / "src"), str(tmp_path / "data")
    write_corpus(src, 3, documents=10)
    common = ["--name=d", "--tokenizer=byte", "--workers=1", "--quiet"]
    subprocess.run(script("prepare.py", src, f"--data-dir={data}", *common), check=True)
    old = snapshot(os.path.join(data, "d"))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a process id that is gone
    os.rename(os.path.join(data, "d"), os.path.join(data, f".d.old-{dead.pid}"))
    os.makedirs(os.path.join(data, f".d.tmp-{dead.pid}"))  # its complete or partial new one
    result = subprocess.run(script("prepare.py", src, f"--data-dir={data}", *common), capture_output=True,
                            text=True)
    assert "already exists" in result.stderr  # the old one is back, so no --overwrite: refused
    assert snapshot(os.path.join(data, "d")) == old and os.listdir(data) == ["d"]


# ----------------------------------------------------------------------------- kill -9: compare.py

def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def comparable(summary):
    """A summary without what depends on the clock or the command line."""
    if isinstance(summary, dict):
        return {k: comparable(v) for k, v in summary.items()
                if k not in ("tokens_per_sec", "peak_memory_bytes", "elapsed", "command", "parallel")}
    return [comparable(v) for v in summary] if isinstance(summary, list) else summary


def test_compare_killed_with_its_runs_finishes_without_redoing_them(data_dir, tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(f"dataset = 'tiny'\ndata_dir = {data_dir!r}\nn_layer = 2\nn_head = 2\nn_embd = 32\n"
                      "mlp_hidden = 64\nblock_size = 32\nbatch_size = 4\nmax_epochs = 0.0\nmax_iters = 20\n"
                      "warmup_iters = 2\neval_interval = 10\neval_iters = 2\nlog_interval = 5\n"
                      "ckpt_interval = 2\ncompile = False\ndtype = 'float32'\ndevice = 'cpu'\npeak_flops = 1e12\n")
    command = script("compare.py", str(config), "--modes=0,3", "--seeds=1", "--name=k")
    (tmp_path / "ref").mkdir()
    subprocess.run(command, cwd=tmp_path / "ref", env=ENV, check=True, capture_output=True, timeout=300)
    (tmp_path / "cut").mkdir()
    runs = tmp_path / "cut" / "runs" / "k"
    proc = subprocess.Popen(command, cwd=tmp_path / "cut", env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (runs / "mode3_seed0" / "ckpt.pt").exists():  # the first run done, the second under way
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(KILL_SEED).uniform(0, 0.3))
    for pid in [proc.pid, *children(proc.pid)]:  # power loss: compare.py and its train.py at once
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the orphaned train.py is gone before the rerun takes the sweep's lock
    finished = {f: mtime(runs / "mode0_seed0" / f) for f in ("metrics.jsonl", "ckpt.pt", "layer_weights.json")}
    rerun = subprocess.run(command, cwd=tmp_path / "cut", env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "mode0_seed0: already done, skipped" in rerun.stdout
    assert finished == {f: mtime(runs / "mode0_seed0" / f) for f in finished}  # not redone
    summaries = [json.load(open(tmp_path / d / "results" / "k" / "summary.json")) for d in ("ref", "cut")]
    assert comparable(summaries[0]) == comparable(summaries[1])


# ----------------------------------------------------------------------------- a full disk

def file_size_limit(nbytes):
    """For the child: writes past nbytes fail with EFBIG, as on a full disk (instead of SIGXFSZ)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_one(data_dir, tmp_path):
    out = str(tmp_path / "run")
    subprocess.run(tiny(data_dir, out, "--max_iters=4", "--ckpt_interval=2"), env=ENV, check=True,
                   capture_output=True)
    ckpt = os.path.join(out, "ckpt.pt")
    before = snapshot(out)
    result = subprocess.run(tiny(data_dir, out, "--max_iters=8", "--ckpt_interval=2", "--init_from=resume"),
                            env=ENV, capture_output=True, text=True,
                            preexec_fn=file_size_limit(os.path.getsize(ckpt) // 2))
    line = one_line(result.stderr)
    assert result.returncode == 1 and "cannot write checkpoint" in line and "free disk space" in line, line
    assert snapshot(out)["ckpt.pt"] == before["ckpt.pt"] and not temporaries(out)
    assert checkpoint.load(ckpt, "")["iter_num"] == 4
    # the first checkpoint of a fresh run: no file at all, not half of one
    fresh = str(tmp_path / "fresh")
    result = subprocess.run(tiny(data_dir, fresh, "--max_iters=4", "--ckpt_interval=2"), env=ENV,
                            capture_output=True, text=True, preexec_fn=file_size_limit(os.path.getsize(ckpt) // 2))
    assert "cannot write checkpoint" in one_line(result.stderr)
    assert not os.path.exists(os.path.join(fresh, "ckpt.pt")) and not temporaries(fresh)


def test_a_shard_write_on_a_full_disk_keeps_the_old_dataset(tmp_path):
    old_src, new_src, data = str(tmp_path / "old"), str(tmp_path / "new"), str(tmp_path / "data")
    write_corpus(old_src, 4, documents=40)
    write_corpus(new_src, 5, documents=60)
    common = ["--name=d", "--tokenizer=byte", "--workers=1", "--val-fraction=0.2", f"--data-dir={data}", "--quiet"]
    subprocess.run(script("prepare.py", old_src, *common), check=True)
    before = snapshot(data)
    result = subprocess.run(script("prepare.py", new_src, "--overwrite", *common), capture_output=True, text=True,
                            preexec_fn=file_size_limit(50_000))
    line = one_line(result.stderr)
    assert result.returncode == 1 and "cannot write" in line and "no dataset was written" in line, line
    assert snapshot(data) == before and os.listdir(data) == ["d"]


# ----------------------------------------------------------------------------- a corrupted checkpoint

def test_the_checksum_catches_one_flipped_bit_that_torch_load_does_not(tmp_path):
    weights = torch.arange(4096, dtype=torch.float32)
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, {"model": {"w": weights, "b": weights.to(torch.bfloat16)}, "iter_num": 3})
    assert checkpoint.load(path, "")["iter_num"] == 3
    raw = bytearray(open(path, "rb").read())
    raw[raw.find(weights[1000:1010].numpy().tobytes()) + 5] ^= 0x10  # one bit of one weight
    open(path, "wb").write(raw)
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weights)  # torch reads it
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt: its contents do not match the sha256"):
        checkpoint.load(path, "")


def test_the_checksum_sees_every_value_and_survives_a_round_trip(tmp_path):
    ckpt = {"model": {"w": torch.ones(3, 2), "h": torch.zeros(2, dtype=torch.bfloat16)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.95)}]},
            "iter_num": 7, "config": {"lr": 1e-3}, "ranks": [{"cuda": None}]}
    reference = checkpoint.digest(ckpt).hexdigest()
    path = str(tmp_path / "c.pt")
    checkpoint.save(path, ckpt)
    loaded = checkpoint.load(path, "")
    assert checkpoint.digest({k: v for k, v in loaded.items() if k != "format_version"}).hexdigest() == reference
    for change in (lambda c: c["model"]["w"].__setitem__((2, 1), 1.0000001),
                   lambda c: c["model"].__setitem__("h", torch.zeros(1, 2, dtype=torch.bfloat16)),
                   lambda c: c["optimizer"]["param_groups"][0].__setitem__("betas", (0.9, 0.96)),
                   lambda c: c.__setitem__("iter_num", 8)):
        changed = torch.load(path, weights_only=True)
        del changed["sha256"], changed["format_version"]
        change(changed)
        assert checkpoint.digest(changed).hexdigest() != reference


# ----------------------------------------------------------------------------- a catalogue of bad inputs

@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    subprocess.run(tiny(data_dir, out, "--max_iters=2", "--ckpt_interval=2"), env=ENV, check=True,
                   capture_output=True, timeout=120)
    return out


def shard(ws, split="train"):
    return sorted(glob.glob(os.path.join(ws, "data", "tiny", f"tiny_{split}_*.bin")))[0]


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def edit_meta(ws, **changes):
    path = os.path.join(ws, "data", "tiny", "meta.json")
    meta = json.load(open(path))
    for split, tokens in changes.items():
        meta["splits"][split]["tokens"] = tokens
    open(path, "w").write(json.dumps(meta))


def flip_a_weight(ws):
    path = os.path.join(ws, "run", "ckpt.pt")
    raw = bytearray(open(path, "rb").read())
    weights = torch.load(path, weights_only=True)["model"]["lm_head.weight"]
    raw[raw.find(weights[5, :8].numpy().tobytes()) + 3] ^= 1
    open(path, "wb").write(raw)


def foreign_version(ws):
    path = os.path.join(ws, "run", "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "format_version": 1}, path)


def train(*args, resume=False):
    """train.py on the workspace's copy of the data: a new run, or resume=True continues the copied one."""
    return lambda ws: tiny(os.path.join(ws, "data"), os.path.join(ws, "run" if resume else "new"),
                           *(("--init_from=resume", "--max_iters=4") if resume else ()), *args)


CATALOGUE = [  # (input, what to do to the workspace first, the command, words the one line must hold)
    ("a config key with a typo (`--n_layers=4`)", None, train("--n_layers=4"),
     ["unknown config key 'n_layers'", "did you mean 'n_layer'"]),
    ("a value of the wrong type (`--n_layer=two`)", None, train("--n_layer=two"), ["--n_layer=two", "expected"]),
    ("a negative learning rate (`--learning_rate=-1`)", None, train("--learning_rate=-1"),
     ["learning_rate must be 0 or more, got -1"]),
    ("`n_embd` not divisible by `n_head` (`--n_embd=30 --n_head=4`)", None, train("--n_embd=30", "--n_head=4"),
     ["n_embd (30) must be divisible by n_head (4)"]),
    ("a config file that is not UTF-8", lambda ws: open(os.path.join(ws, "c.py"), "wb").write(b"n_layer = 2 # \xff\n"),
     lambda ws: train()(ws)[:2] + [os.path.join(ws, "c.py")] + train()(ws)[2:], ["c.py", "save it as UTF-8"]),
    ("a config file that does not exist", None, lambda ws: train()(ws)[:2] + ["configs/nope.py"] + train()(ws)[2:],
     ["configs/nope.py", "not found"]),
    ("a config file with a syntax error", lambda ws: open(os.path.join(ws, "c.py"), "w").write("n_layer = = 2\n"),
     lambda ws: train()(ws)[:2] + [os.path.join(ws, "c.py")] + train()(ws)[2:], ["c.py:1", "SyntaxError"]),
    ("a dataset that does not exist (`--dataset=nope`)", None, train("--dataset=nope"), ["nope"]),
    ("a truncated shard", lambda ws: truncate(shard(ws), 2000), train(), ["tiny_train", "truncated", "--tokenizer byte"]),
    ("a shard with a wrong magic number", lambda ws: patch(shard(ws), 0, b"\x00\x00\x00\x00"), train(),
     ["tiny_train", "magic", "--tokenizer byte"]),
    ("a shard of another version", lambda ws: patch(shard(ws), 4, (9).to_bytes(4, "little")), train(),
     ["tiny_train", "version", "--tokenizer byte"]),
    ("a foreign file in place of a shard", lambda ws: open(shard(ws), "wb").write(os.urandom(3000)), train(),
     ["tiny_train", "not a token shard"]),
    ("`meta.json` disagreeing with the shards", lambda ws: edit_meta(ws, train=123), train(), ["meta.json", "123", "--overwrite"]),
    ("a shard listed in `meta.json` that is missing", lambda ws: os.remove(shard(ws, "val")), train(),
     ["tiny_val", "cannot read shard", "--tokenizer byte"]),
    ("resume with another residual mode (`--residual_mode=1`)", None, train("--residual_mode=1", resume=True),
     ["residual_mode=3 in the checkpoint but 1", "own config"]),
    ("resume with another shape (`--n_layer=3`)", None, train("--n_layer=3", resume=True),
     ["n_layer=2 in the checkpoint but 3"]),
    ("resume with a larger `block_size` than the checkpoint's", None, train("--block_size=64", resume=True),
     ["block_size=32 in the checkpoint but 64"]),
    ("a truncated checkpoint", lambda ws: truncate(os.path.join(ws, "run", "ckpt.pt"), 5000),
     train(resume=True), ["cannot read checkpoint", "truncated"]),
    ("a checkpoint of another format version", foreign_version, train(resume=True), ["format version 1", "version 2"]),
    ("a checkpoint with one flipped bit", flip_a_weight, train(resume=True), ["corrupt", "sha256"]),
    ("`--init_from=resume` with no checkpoint", lambda ws: os.remove(os.path.join(ws, "run", "ckpt.pt")),
     train(resume=True), ["no checkpoint at", "--init_from=scratch"]),
    ("a new run into an `out_dir` that holds a checkpoint", None, lambda ws: train(f"--out_dir={ws}/run")(ws),
     ["exists", "--init_from=resume"]),
    ("an `out_dir` that cannot be written (a file in its place)", lambda ws: open(os.path.join(ws, "f"), "w").close(),
     lambda ws: train(f"--out_dir={os.path.join(ws, 'f', 'run')}")(ws), ["check the path"]),
    ("an empty corpus", lambda ws: os.makedirs(os.path.join(ws, "empty")) or open(os.path.join(ws, "empty", "a.txt"), "w").close(),
     lambda ws: script("prepare.py", os.path.join(ws, "empty"), "--tokenizer=byte", f"--data-dir={ws}/data"),
     ["empty corpus", "files that hold text"]),
    ("a corpus path that does not exist", None,
     lambda ws: script("prepare.py", os.path.join(ws, "nothere"), "--tokenizer=byte", f"--data-dir={ws}/data"),
     ["nothere"]),
    ("a dataset name that exists, without `--overwrite`", None,
     lambda ws: script("prepare.py", os.path.join(ws, "data"), "--name=tiny", "--tokenizer=byte",
                       f"--data-dir={ws}/data"), ["already exists", "--overwrite"]),
    ("`--start` text the tokenizer cannot represent (a lone surrogate)", None,
     lambda ws: [os.fsencode(a) for a in script("sample.py", f"--ckpt={ws}/run/ckpt.pt", "--device=cpu")]
     + [b"--start=\xff"], ["cannot represent", "start text"]),
    ("`sample.py` with no checkpoint", None, lambda ws: script("sample.py", f"--out_dir={ws}/none", "--device=cpu"),
     ["no checkpoint", "train one first"]),
    ("a `--start=FILE:` that does not exist", None,
     lambda ws: script("sample.py", f"--ckpt={ws}/run/ckpt.pt", "--start=FILE:nothere.txt", "--device=cpu"),
     ["cannot read the start text", "nothere.txt"]),
    ("a `compare.py --sweep` key that does not exist", None,
     lambda ws: script("compare.py", "configs/cpu.py", "--sweep", "lr=1,2", "--dry-run"),
     ["unknown config key 'lr'"]),
]


def run_case(case, ws):
    label, setup, command, words = case
    if setup:
        setup(ws)
    before = snapshot(ws)
    result = subprocess.run(command(ws), capture_output=True, env=ENV, cwd=ROOT, timeout=120)
    stderr = result.stderr.decode("utf-8", "replace")
    return label, words, result.returncode, stderr, before, snapshot(ws)


def test_the_catalogue_of_bad_inputs(data_dir, finished_run, tmp_path):
    """Each bad input ends its script with exit 1 and one line naming the problem and the fix, and
    leaves every file as it was. Two at a time: each is mostly a Python start-up."""
    workspaces = []
    for i, case in enumerate(CATALOGUE):
        ws = str(tmp_path / f"case{i:02d}")
        shutil.copytree(os.path.join(data_dir, "tiny"), os.path.join(ws, "data", "tiny"))
        shutil.copytree(finished_run, os.path.join(ws, "run"))
        workspaces.append(ws)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_case, CATALOGUE, workspaces))
    for label, words, code, stderr, before, after in results:
        print(f"{label} | {stderr.strip()}")
    for label, words, code, stderr, before, after in results:
        line = one_line(stderr)
        assert code == 1 and all(w in line for w in words), (label, code, line)
        assert after == before, (label, "files changed")
    readme = open(os.path.join(ROOT, "docs", "faults.md")).read()
    assert len(CATALOGUE) >= 20 and all(case[0] in readme for case in CATALOGUE)  # docs/faults.md's table
