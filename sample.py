"""
Sample from a trained model, printing tokens as they are produced.

    python sample.py                                   # out/ckpt.pt, 3 samples
    python sample.py --out_dir=runs/x --start="def " --num_samples=1 --max_new_tokens=500
    python sample.py --start=FILE:prompt.txt --temperature=0    # greedy, prompt read from a file

Options are the globals below, set by config files and --key=value flags as in train.py. The
tokenizer is the one named in the checkpoint, so nothing is read from data/.
"""
import contextlib
import glob
import os
import sys

import torch

from harness import checkpoint, configurator
from harness.checkpoint import CheckpointError
from harness.configurator import ConfigError
from model import GPT, GPTConfig
from prepare import DataError, get_tokenizer

# -----------------------------------------------------------------------------
out_dir = "out"  # the run to sample from: out_dir/ckpt.pt, else the newest out_dir/*/ckpt.pt
ckpt = ""  # a checkpoint path; overrides out_dir when set
start = "\n"  # the prompt, or "FILE:path" to read it from a file; "" starts from end-of-text
num_samples = 3
max_new_tokens = 256
temperature = 0.8  # 0 is greedy; < 1 sharper, > 1 more random
top_k = 200  # keep only the k most likely tokens (0: all)
top_p = 1.0  # nucleus sampling: the fewest tokens with this much probability (1.0: all)
seed = 1337
device = "auto"  # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16 (see configurator.resolve_dtype)
compile = False  # torch.compile the forward (worth it only for long generations on a GPU)
stop_at_eot = False  # end a sample at the end-of-text token
use_cache = True  # reuse keys and values of earlier positions (off: recompute every token)
# -----------------------------------------------------------------------------


def find_checkpoint(out_dir):
    """out_dir/ckpt.pt, or else the newest checkpoint one folder down: the method configs write to
    out/method3, out/method3_cpu, ..., and `python sample.py` should read the latest run."""
    path = os.path.join(out_dir, "ckpt.pt")
    runs = glob.glob(os.path.join(glob.escape(out_dir), "*", "ckpt.pt"))
    runs.sort(key=os.path.getmtime)
    if os.path.exists(path) or not runs:
        return path
    print(f"sample.py: sampling from the newest run, {runs[-1]}", file=sys.stderr)
    return runs[-1]


def load_model(path, device, compile):
    """The checkpoint's model, in eval mode on device, and its tokenizer."""
    ckpt = checkpoint.load(path, "train one first, e.g. `python train.py configs/method3.py "
                           "configs/cpu.py`, or point to one with --out_dir=DIR or --ckpt=PATH")
    for key in ("model_args", "model", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"{path} has no {key!r}; it was not written by train.py")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit its model_args "
                              f"({str(e).splitlines()[0]})") from None
    model.eval().to(device)
    if compile:
        # The forward itself, not the module: generate_stream calls self(...), which a compiled
        # wrapper around the module would never reach. dynamic: the cached length grows each token.
        model.forward = torch.compile(model.forward, dynamic=True)
    return model, get_tokenizer(ckpt["tokenizer"]["name"])


def read_start(text, tokenizer, vocab_size):
    """The prompt (text, or FILE:path) -> (its text, its token ids); a ConfigError if the tokenizer
    cannot represent it exactly."""
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the start text from {text[5:]}: {e}") from None
    if text == "":
        return text, [tokenizer.eot_token]
    with contextlib.suppress(UnicodeError, ValueError):
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) == text and all(i < vocab_size for i in ids):
            return text, ids
    raise ConfigError(f"the {tokenizer.name} tokenizer of this checkpoint cannot represent "
                      "the start text exactly (invalid Unicode such as a lone surrogate?); "
                      "pass UTF-8 text")


def main(config):
    device = configurator.resolve_device(config["device"])
    device_type = device.split(":")[0]  # cuda:1 -> cuda
    dtype = configurator.resolve_dtype(config["dtype"], device_type)
    path = config["ckpt"] or find_checkpoint(config["out_dir"])
    model, tokenizer = load_model(path, device, config["compile"])
    text, prompt = read_start(config["start"], tokenizer, model.config.vocab_size)

    autocast = torch.autocast(device_type, dtype=configurator.DTYPES[dtype],
                              enabled=dtype != "float32")
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    out = sys.stdout.buffer
    for _ in range(config["num_samples"]):
        idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
        out.write(text.encode("utf-8"))
        pending = []  # tokens not printed yet
        with autocast:
            for token in model.generate_stream(
                    idx, config["max_new_tokens"], temperature=config["temperature"],
                    top_k=config["top_k"] or None, top_p=config["top_p"],
                    use_cache=config["use_cache"], generator=generator,
                    vocab_size=tokenizer.vocab_size):
                token = token.item()
                if token == tokenizer.eot_token and config["stop_at_eot"]:
                    break
                pending.append(token)
                piece = tokenizer.decode(pending)
                if piece.endswith("\ufffd") and len(pending) < 4:
                    continue  # a character split across tokens: wait for the rest of its bytes
                out.write(piece.encode("utf-8"))
                out.flush()
                pending = []
        out.write(tokenizer.decode(pending).encode("utf-8") + b"\n---------------\n")
        out.flush()


if __name__ == "__main__":
    try:
        main(configurator.load(sys.argv[1:], configurator.defaults(__file__), "sample.py"))
    except (ConfigError, CheckpointError, DataError) as e:
        sys.exit(f"sample.py: {e}")
