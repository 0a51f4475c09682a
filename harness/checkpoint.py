"""
Saving a run and picking it up again exactly: ckpt.pt with every rank's random state and partial log
window, the one checkpoint loader (train.py and sample.py), and the signal-safe stop.

A checkpoint is a dict of tensors and plain values, so it loads with weights_only=True: loading a
file runs no code from it. It carries the sha256 of its contents: a bit flipped on disk or in a copy
stops the loader instead of being trained on.
"""
import dataclasses
import hashlib
import signal

import torch
import torch.distributed as dist

from .report import atomic_write

FORMAT_VERSION = 2  # of ckpt.pt; every reader checks it. 2: with its sha256


class CheckpointError(Exception):
    """An unreadable or mismatched checkpoint; the scripts print it as one line."""


def digest(value, h=None):
    """sha256 over a checkpoint's contents in a fixed order: each tensor's dtype, shape and bytes,
    each plain value's repr, dict keys sorted. It survives a save and load unchanged."""
    h = h or hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            digest(item, h)
    else:
        h.update(repr(value).encode())
    return h


def save(path, ckpt):
    """Writes ckpt with its format version and checksum, atomically: a failed write (a full disk)
    leaves the previous checkpoint as it was and stops with one line."""
    ckpt = {**ckpt, "format_version": FORMAT_VERSION}
    ckpt["sha256"] = digest(ckpt).hexdigest()
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError on a failed write
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot write checkpoint {path} ({type(e).__name__}: {first}); the "
                              "one saved before is intact: free disk space, then resume with "
                              "--init_from=resume") from None


def load(path, fix_if_missing):
    """Reads a checkpoint and checks that it is one of ours; fix_if_missing: advice for no file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}; {fix_if_missing}") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {first}); it is "
                              "truncated, corrupt or not from train.py: delete it, or point "
                              "elsewhere") from None
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}, but this code "
                              f"reads version {FORMAT_VERSION}; use the train.py and sample.py of "
                              "its own version")
    if ckpt.pop("sha256", None) != digest(ckpt).hexdigest():
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the sha256 "
                              "saved with them (a disk or copy error); delete it, or copy it again")
    return ckpt


def check_fits(ckpt, path, model_args, tokenizer, config_class):
    """A resumed run must have the checkpoint's model shape and tokenizer (dropout may change).
    config_class (model.GPTConfig) fills in the fields added since the checkpoint was written with
    their defaults, as they were then."""
    old = dataclasses.asdict(config_class(**ckpt["model_args"]))
    mismatched = [f"{k}={old.get(k)!r} in the checkpoint but {v!r} in the config"
                  for k, v in model_args.items() if k != "dropout" and old.get(k) != v]
    if ckpt["tokenizer"] != tokenizer:
        mismatched.append(f"tokenizer {ckpt['tokenizer']} in the checkpoint but {tokenizer} in "
                          "the dataset")
    if mismatched:
        raise CheckpointError(f"checkpoint {path} does not match the config: "
                              f"{'; '.join(mismatched)}. "
                              "Use the run's own config, or another out_dir")


def restore_optimizer(optimizer, state):
    """The checkpoint's moments and step counts, but this config's hyperparameters (weight_decay,
    betas, lr_mult, ...): load_state_dict alone would bring back the old run's values."""
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)


def config_changes(old, new):
    """'key old -> new' for each config key that differs from the checkpoint's."""
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
            if old.get(k) != v and k != "init_from"]


# -----------------------------------------------------------------------------
# what each rank alone holds: its random state (dropout draws from it) and its partial log window

def rank_states(ddp, loss_sum):
    """Every rank's state, gathered to all ranks (a collective: every rank must call it)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    mine = {"cpu": torch.get_rng_state(), "loss_sum": loss_sum.detach().cpu(),
            "cuda": torch.cuda.get_rng_state() if cuda else None}
    if not ddp:
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def restore_rank_state(states, rank, world_size, device):
    """Sets this rank's random state -> its loss sum since the last log line, or None where the
    checkpoint had another number of processes (then dropout masks differ from an unbroken run)."""
    if len(states) != world_size:
        if rank == 0:
            print(f"train.py: the checkpoint holds {len(states)} processes' states, this run "
                  f"{world_size}: dropout and the first logged loss will differ from an unbroken "
                  "run", flush=True)
        return None
    torch.set_rng_state(states[rank]["cpu"])
    if states[rank]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states[rank]["cuda"])
    return states[rank]["loss_sum"].to(device)


# -----------------------------------------------------------------------------
# stopping: SIGINT or SIGTERM asks the loop to finish its step, save and exit

STOP = {"signal": 0}


def request_stop(signum, frame):
    if STOP["signal"]:  # the second signal: stop at once, keeping the last checkpoint
        raise SystemExit(f"{signal.Signals(signum).name} again; exiting without saving")
    STOP["signal"] = signum


def catch_stop_signals():
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, request_stop)
