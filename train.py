"""
Train a GPT in one of the residual modes of model.py, on one CPU or GPU or on several through DDP.

    python train.py configs/method3.py                      # the original experiment, method 3
    python train.py configs/method3.py configs/cpu.py       # the same, small enough for a CPU
    python train.py configs/method3.py --init_from=resume   # continue an interrupted run exactly
    torchrun --standalone --nproc_per_node=8 train.py configs/method3.py

The globals below are the defaults: the original experiment's model and budget. Config files (Python
assignments) and then --key=value flags override them, read left to right (configurator.py).

Writes to out_dir (rank 0 only): config.json (the resolved config), metrics.jsonl (a record per log
line, eval and finish), ckpt.pt (checkpoint.py), and at the end layer_weights.{json,txt,png}.
"""
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import model as model_lib
import prepare
from harness import checkpoint, configurator, hardware, report, shards

# -----------------------------------------------------------------------------
# config: the original experiment. 12 blocks, n_embd 768, 12 heads, MLP 2048, 1,024 tokens of
# context, GPT-2 BPE on the Python standard library, 5 epochs.
# data and output
dataset = "pystdlib"  # a folder in data_dir made by prepare.py; built-ins are made on first use
data_dir = "data"
out_dir = "out"
# model (see model.py)
residual_mode = 0  # a number, or a name from model.MODES (model.py's docstring has the equations)
current_logit = 0.0  # modes 3, 4, 9: the initial logit of a block's (stream's) own state (model.py)
hc_streams = 4  # modes 8, 9: the number of residual streams
mhc_iters = 20  # mode 9: Sinkhorn-Knopp iterations
n_layer = 12
n_head = 12
n_embd = 768
mlp_hidden = 2048  # MLP width; 0 means 4 * n_embd
block_size = 1024  # tokens of context; a training window holds block_size + 1 tokens
dropout = 0.0
bias = True  # biases in Linears and LayerNorms, like GPT-2
norm_eps = 1e-5  # LayerNorm's eps
# batch and budget
batch_size = 4  # windows per micro-step per process
gradient_accumulation_steps = 8  # micro-steps per iteration over all processes: DDP splits them up
# (4 x 8 = the original's 32 windows per iteration; 8 divides among 1, 2, 4 or 8 processes)
max_epochs = 5.0  # > 0: train this many passes over the training windows
max_iters = 5000  # optimizer steps, used when max_epochs is 0
# AdamW with linear warmup, then cosine decay to min_lr
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
lr_decay_iters = 0  # where the decay reaches min_lr; 0: the run's end (a resumed run keeps its own)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 turns clipping off
mixing_lr_mult = 1.0  # modes 3-9: learning-rate multiplier of the residual-mixing parameters
# evaluation, logging, checkpoints
eval_interval = 200  # evaluate every this many iterations, and at the end
eval_iters = 40  # validation batches of batch_size windows: a fixed set, the same in every run
log_interval = 10
ckpt_interval = 200  # save out_dir/ckpt.pt every this many iterations, and at the end
init_from = "scratch"  # "scratch", or "resume" from out_dir/ckpt.pt
seed = 1337  # model init and the order of the training windows
# system
device = "auto"  # auto: cuda, else mps, else cpu; or e.g. "cuda:1"
dtype = "auto"  # auto: bfloat16 where native, float16 on older GPUs, float32 otherwise
compile = True  # torch.compile the model; where it is unavailable: eager, with a notice
backend = "auto"  # DDP backend: auto is nccl on GPU, gloo on CPU
peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0 looks it up (GPU table) or measures it (CPU)
# -----------------------------------------------------------------------------


class NonFiniteLoss(Exception):
    """The loss went nan or inf."""


def one_line_errors(kind, error, traceback):
    """Bad input ends the run with one line that names the fix; anything else, a traceback."""
    ours = (configurator.ConfigError, checkpoint.CheckpointError, prepare.DataError, NonFiniteLoss)
    if issubclass(kind, ours):
        print(f"train.py: {error}", file=sys.stderr)
    elif issubclass(kind, torch.OutOfMemoryError):
        print("train.py: out of device memory; lower batch_size and raise "
              "gradient_accumulation_steps to keep the batch, or shrink the model", file=sys.stderr)
    elif issubclass(kind, OSError):  # a full disk, an unwritable out_dir: files, not the code
        print(f"train.py: {error}; check the path, its permissions and the free disk space "
              "(the last checkpoint is intact)", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


sys.excepthook = one_line_errors
defaults = configurator.defaults(__file__)
config = configurator.load(sys.argv[1:], defaults,
                           parsers={"residual_mode": model_lib.parse_residual_mode})
configurator.check_train(config)
globals().update(config)
model_args = configurator.model_args(config, model_lib.GPTConfig)  # checked before any data is read

# -----------------------------------------------------------------------------
# device, precision, DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
ddp = "RANK" in os.environ
rank, local_rank, world_size = (int(os.environ.get(k, default)) for k, default
                                in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
device = torch.device(configurator.resolve_device(device, local_rank if ddp else None))
if ddp:
    dist.init_process_group(backend if backend != "auto" else
                            "nccl" if device.type == "cuda" else "gloo")
master = rank == 0  # rank 0 alone prints and writes
dtype = configurator.resolve_dtype(dtype, device.type)  # decided after every override
accum = gradient_accumulation_steps // world_size  # micro-steps per process
if device.type == "cuda":  # TF32 for what stays in fp32 (nanoGPT does the same)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
ptdtype = configurator.DTYPES[dtype]
autocast = torch.autocast(device.type, dtype=ptdtype, enabled=dtype != "float32")

# -----------------------------------------------------------------------------
# data: each split is one long token stream, cut into windows of block_size + 1 tokens (prepare.py)
data_path = os.path.join(data_dir, dataset)
if master:
    prepare.ensure_builtin(data_dir, dataset)  # a built-in corpus is prepared on first use
if ddp:
    dist.barrier()  # every rank, whatever it saw on disk: the others wait while rank 0 prepares
meta = shards.read_meta(data_path)  # missing: a DataError that names the prepare.py command
train_data = shards.TokenStream(shards.open_split(data_path, "train", meta), block_size)
val_data = shards.TokenStream(shards.open_split(data_path, "val", meta), block_size)
if train_data.num_windows == 0 or val_data.num_windows == 0:
    raise prepare.DataError(f"dataset {dataset!r} is too small for one window of block_size + 1 = "
                            f"{block_size + 1} tokens (train {train_data.num_tokens}, val "
                            f"{val_data.num_tokens}); lower block_size")
windows_per_iter = batch_size * gradient_accumulation_steps  # the global batch
if max_epochs > 0:
    max_iters = math.ceil(max_epochs * train_data.num_windows / windows_per_iter)
order = shards.TrainOrder(train_data.num_windows, seed)  # epoch e: a shuffle seeded by (seed, e)
val_ids = shards.eval_window_ids(val_data.num_windows, eval_iters * batch_size)
tokenizer = {"name": meta["tokenizer"], **{k: meta[k] for k in ("vocab_size", "eot_token")}}

# -----------------------------------------------------------------------------
# model, optimizer, resume. The vocabulary is padded up to a multiple of 64 for faster matmuls; the
# extra logits are never targets, so training pushes them down
model_args = dataclasses.asdict(model_lib.GPTConfig(  # resolved: mlp_hidden, the mode's number
    **model_args, vocab_size=-(-meta["vocab_size"] // 64) * 64))
ckpt_path = os.path.join(out_dir, "ckpt.pt")
ckpt = None
if init_from == "resume":
    ckpt = checkpoint.load(ckpt_path, "start with --init_from=scratch")
    checkpoint.check_fits(ckpt, ckpt_path, model_args, tokenizer, model_lib.GPTConfig)
elif os.path.exists(ckpt_path):
    raise checkpoint.CheckpointError(f"{ckpt_path} exists; continue it with --init_from=resume, or "
                                     "delete it / choose another out_dir to start from scratch")
# an extended run keeps its decay length unless lr_decay_iters is given: no jump back up of the lr
lr_decay_iters = lr_decay_iters or (ckpt["config"]["lr_decay_iters"] if ckpt else max_iters)
config.update({k: globals()[k] for k in config}, device=str(device))  # as resolved: dtype, ...

torch.manual_seed(seed + rank)
raw_model = model_lib.GPT(model_lib.GPTConfig(**model_args)).to(device)
if ckpt:
    raw_model.load_state_dict(ckpt["model"])  # copied into the device's parameters
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device.type,
                                           mixing_lr_mult)
scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")  # fp16 needs loss scaling
iter_num, data_pos, elapsed_before, best_val_loss, last_eval = 0, 0, 0.0, float("inf"), None
loss_sum, window_iters = torch.zeros((), device=device), 0  # losses since the last log line
if ckpt:
    checkpoint.restore_optimizer(optimizer, ckpt["optimizer"])  # with this config's settings
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    iter_num, data_pos, elapsed_before = ckpt["iter_num"], ckpt["data_pos"], ckpt["elapsed"]
    best_val_loss, last_eval = ckpt["best_val_loss"], ckpt["last_eval"]
    restored = checkpoint.restore_rank_state(ckpt["ranks"], rank, world_size, device)
    if restored is not None:  # this rank's random state is back; its open log window too
        loss_sum, window_iters = restored, ckpt["window_iters"]
    changes = checkpoint.config_changes({**defaults, **ckpt["config"]}, config)  # new keys: default
    if master:
        print(f"resuming {ckpt_path} at iter {iter_num}"
              + (f"; changed since, and applied: {', '.join(changes)}" if changes else ""))
saved_iter = iter_num  # the iteration ckpt.pt holds (a fresh run has none, and needs none)

# rank 0 alone writes: out_dir/config.json, and metrics.jsonl, kept up to the checkpoint's iter
metrics_file = report.open_run(out_dir, config, iter_num if ckpt else None) if master else None


def get_lr(it):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def get_batch(pos, micro_step):
    """Micro-step j of rank r in the iteration that starts at data position pos: the ranks take
    turns, so together they cover the global batch as one process with all the micro-steps would."""
    start = pos + (micro_step * world_size + rank) * batch_size
    return to_device(train_data.windows(order.ids(start, batch_size)))


def to_device(windows):
    """(B, T + 1) tokens -> x, y: (B, T) inputs and next-token targets on the device."""
    b = torch.from_numpy(windows)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        b = b.pin_memory()
    b = b.to(device, non_blocking=True)
    return b[:, :-1].contiguous(), b[:, 1:].contiguous()


@torch.no_grad()
def evaluate(model):
    """Mean next-token loss and top-1 accuracy over the fixed validation windows. DDP ranks take
    every world_size-th batch and the sums are added across ranks. Modes 6, 8 and 9 also record
    their routing or stream mixing, averaged over these windows; other modes record nothing."""
    model.eval()
    raw_model.record_routing(True)
    t0 = time.perf_counter()
    batches = [val_ids[i:i + batch_size] for i in range(0, len(val_ids), batch_size)]
    loss_sum = correct = tokens = 0.0
    for ids in batches[rank::world_size]:
        x, y = to_device(val_data.windows(ids))
        with autocast:
            logits, loss = model(x, y)  # (B, T, V); the mean over B*T, fp32 under autocast
        loss_sum += loss.item() * y.numel()
        correct += (logits.argmax(dim=-1) == y).sum().item()
        tokens += y.numel()
    if ddp:
        totals = torch.tensor([loss_sum, correct, tokens], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, correct, tokens = totals.tolist()
        if raw_model.routing_sums is not None:
            dist.all_reduce(raw_model.routing_sums)
            dist.all_reduce(raw_model.routing_count)
    raw_model.record_routing(False)
    model.train()
    runtime = time.perf_counter() - t0
    return {"eval_loss": loss_sum / tokens, "eval_perplexity": math.exp(loss_sum / tokens),
            "eval_accuracy": correct / tokens, "eval_runtime": runtime,
            "eval_samples": len(val_ids), "eval_samples_per_second": len(val_ids) / runtime,
            "eval_steps_per_second": len(batches) / runtime}


# -----------------------------------------------------------------------------
# the run's cost, said before compiling. DDP, then compile: dynamo splits the graph at DDP's
# buckets, so each bucket's all-reduce overlaps the rest of the backward (torch's DDP notes). Eval
# runs the same model: without buffers to broadcast, ranks may evaluate different batch counts
peak, peak_source = ((peak_flops, "peak_flops") if peak_flops else
                     hardware.peak_flops(device, ptdtype))  # for MFU; None: unknown
if master:
    start = {"type": "start", "iter": iter_num, "world_size": world_size,
             "tokens_per_iter": windows_per_iter * block_size,
             "train_tokens": train_data.num_tokens,
             "train_windows": train_data.num_windows, "val_tokens": val_data.num_tokens,
             "num_params": raw_model.num_params(), "resumed": bool(ckpt),
             "unigram_entropy": shards.unigram_entropy(train_data.shards, meta["vocab_size"]),
             "peak_flops": peak, "peak_source": peak_source, "flops": (max_iters - iter_num)
             * windows_per_iter * block_size * raw_model.flops_per_token()}  # to the end
    report.record(metrics_file, start)
    print(report.format_start(start, config, len(val_ids)), flush=True)
model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False) if ddp else raw_model
x, y = get_batch(data_pos, 0)
model = hardware.compile_or_eager(model, x, y, autocast, master) if compile else model
checkpoint.catch_stop_signals()

# -----------------------------------------------------------------------------
# the training loop. At each iteration boundary: evaluate, save, stop; then one optimizer step
nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # on the device: no sync every step
# the last step's lr and gradient norm (logged before a step only if a resume changed log_interval)
lr, grad_norm = get_lr(max(iter_num - 1, 0)), torch.tensor(float("nan"))
first_iter, t_start = iter_num, time.perf_counter()
window_start = step_start = t_start
paused = 0.0  # eval and checkpoint time since the last log line, left out of tokens/s
while True:
    finished = iter_num >= max_iters
    boundary = finished or not (iter_num % log_interval and iter_num % eval_interval
                                and iter_num % ckpt_interval)
    if ddp and boundary:  # the ranks agree on stop requests and bad losses: a sync only here
        asked = torch.tensor(float(checkpoint.STOP["signal"]), device=device)
        flags = torch.stack([nonfinite.float(), asked])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite |= flags[0] > 0
        checkpoint.STOP["signal"] = int(flags[1].item())
    stop = checkpoint.STOP["signal"] if boundary or not ddp else 0  # no rank leaves alone
    if iter_num == first_iter + 1 and master:  # one iteration timed: the whole run's estimate
        took, left = time.perf_counter() - step_start, max_iters - first_iter
        print(f"first iteration {took:.2f} s: {left} take about {report.hms(took * left)}")
    is_log = iter_num % log_interval == 0 and window_iters > 0
    evaluated = last_eval is not None and last_eval["iter"] == iter_num  # before the checkpoint
    is_eval = (iter_num % eval_interval == 0 or finished) and not evaluated
    is_ckpt = (iter_num % ckpt_interval == 0 or finished or stop) and saved_iter < iter_num
    if (is_log or is_eval or is_ckpt) and nonfinite.item():
        raise NonFiniteLoss(f"the loss or gradient became nan/inf by iter {iter_num}; stopping "
                            f"without saving, the last checkpoint (iter {saved_iter}) is kept. "
                            "Lower learning_rate, or raise warmup_iters or grad_clip")
    if is_log:
        if ddp:  # the mean over all ranks, as one process with the same global batch would see it
            dist.all_reduce(loss_sum)  # a sum: gloo has no AVG
            loss_sum /= world_size
        dt = time.perf_counter() - window_start - paused  # true: .item() above waited for the GPU
        tokens_per_sec = window_iters * windows_per_iter * block_size / dt
        rec = {"type": "train", "iter": iter_num, "epoch": data_pos / train_data.num_windows,
               "tokens": data_pos * block_size, "loss": loss_sum.item() / window_iters, "lr": lr,
               "grad_norm": grad_norm.item(), "tokens_per_sec": tokens_per_sec,
               "mfu": raw_model.estimate_mfu(tokens_per_sec / world_size, peak) if peak else None,
               "elapsed": elapsed_before + time.perf_counter() - t_start,
               "eta": (max_iters - iter_num) * dt / window_iters}
        report.record(metrics_file, rec)
        if master:
            print(report.format_log(rec, max_iters), flush=True)
        loss_sum.zero_()
        window_start, window_iters, paused = time.perf_counter(), 0, 0.0
    t_pause = time.perf_counter()
    if is_eval:
        last_eval = {"type": "eval", "iter": iter_num, "epoch": data_pos / train_data.num_windows,
                     "tokens": data_pos * block_size, **evaluate(model)}
        best_val_loss = min(best_val_loss, last_eval["eval_loss"])
        report.record(metrics_file, last_eval)
        weights = report.format_mixing(report.mixing_rows(raw_model), raw_model.mode)
        if master:
            print(report.format_eval(last_eval) + ("\n" + weights if weights else ""), flush=True)
    if is_ckpt:
        ranks = checkpoint.rank_states(ddp, loss_sum)  # a collective: every rank takes part
        if master:
            checkpoint.save(ckpt_path, {  # with its format version and sha256
                "model_args": model_args, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "iter_num": iter_num, "data_pos": data_pos,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "ranks": ranks,
                "window_iters": window_iters, "config": config,
                "tokenizer": tokenizer, "best_val_loss": best_val_loss, "last_eval": last_eval,
                "done": finished, "elapsed": elapsed_before + time.perf_counter() - t_start})
            os.fsync(metrics_file.fileno())  # the metrics up to the checkpoint are on disk too
        saved_iter = iter_num
    if finished or stop:
        break
    paused += time.perf_counter() - t_pause
    step_start = time.perf_counter()

    # ---- one optimizer step: no bookkeeping beyond the loss and the finiteness flag ----
    lr = get_lr(iter_num)
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
            x, y = get_batch(data_pos + windows_per_iter * last, 0 if last else micro_step + 1)
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
        nonfinite |= ~torch.isfinite(loss.detach())
    if scaler.is_enabled():
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or float("inf"))
    if not scaler.is_enabled():  # with fp16, inf gradients are routine: the scaler skips them
        nonfinite |= ~torch.isfinite(grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # ---- end of the step ----
    iter_num += 1
    data_pos += windows_per_iter
    window_iters += 1

# -----------------------------------------------------------------------------
# the end: a stop leaves a resume hint; a finished run writes its learned weights and final record
if checkpoint.STOP["signal"] and iter_num < max_iters:
    resume = [] if "--init_from=resume" in sys.argv else ["--init_from=resume"]
    if master:
        print(f"train.py: stopped by {signal.Signals(checkpoint.STOP['signal']).name} at iter "
              f"{iter_num}; checkpoint saved to {ckpt_path}. Resume with: "
              + " ".join(["python", "train.py", *sys.argv[1:], *resume]))
    sys.exit(128 + checkpoint.STOP["signal"])
if master:
    report.write_mixing(out_dir, report.mixing_rows(raw_model), model_args,
                        time.strftime("%Y-%m-%d %H:%M:%S"), raw_model.mode)
    elapsed = elapsed_before + time.perf_counter() - t_start
    report.record(metrics_file, {
        "type": "done", "iter": iter_num, "epoch": data_pos / train_data.num_windows,
        "tokens": data_pos * block_size, "best_val_loss": best_val_loss, "elapsed": elapsed,
        **{k: v for k, v in last_eval.items() if k.startswith("eval_")},
        "peak_memory_bytes": report.peak_memory_bytes(device.type)})
    metrics_file.close()
    print(f"done: {iter_num} iters in {report.hms(elapsed)}, eval_loss "
          f"{last_eval['eval_loss']:.4f} (best {best_val_loss:.4f}); wrote ckpt.pt, metrics.jsonl "
          f"and layer_weights.* to {out_dir}")
if ddp:
    dist.destroy_process_group()
