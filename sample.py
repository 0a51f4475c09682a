"""
Sample from a trained model, printing tokens as they are produced.

    python sample.py                                   # out/ckpt.pt, 3 samples
    python sample.py --out_dir=runs/x --start="def " --num_samples=1 --max_new_tokens=500
    python sample.py --start=FILE:prompt.txt --temperature=0    # greedy, prompt read from a file

Options are the globals below, set with --key=value. The tokenizer is the one named in the checkpoint,
so nothing is read from data/.
"""
import glob
import os
import sys
from ast import literal_eval
from contextlib import nullcontext
from difflib import get_close_matches

import torch

from model import GPT, GPTConfig
from prepare import DataError, get_tokenizer

# -----------------------------------------------------------------------------
out_dir = "out"  # the run to sample from: out_dir/ckpt.pt, else the newest out_dir/*/ckpt.pt
ckpt = ""  # a checkpoint path; overrides out_dir when set
start = "\n"  # the prompt, or "FILE:path" to read it from a file; "" starts from the end-of-text token
num_samples = 3
max_new_tokens = 256
temperature = 0.8  # 0 is greedy; < 1 sharper, > 1 more random
top_k = 200  # keep only the k most likely tokens (None or 0: all)
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability (1.0: all)
seed = 1337
device = "auto"  # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16; auto is bfloat16 on CUDA GPUs that have it, else float32
compile = False  # torch.compile the model (worth it only for long generations on a GPU)
stop_at_eot = False  # end a sample at the end-of-text token
use_cache = True  # reuse keys and values of earlier positions (off: recompute the window every token)
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------
CHECKPOINT_FORMAT = 1  # the "format_version" this script reads; train.py writes it


def fail(message):
    sys.exit(f"sample.py: {message}")


def apply_overrides(argv, config):
    """--key=value arguments onto the globals above, in the style of train.py."""
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            fail(f"bad argument {arg!r}; options look like --key=value")
        key, value = arg[2:].split("=", 1)
        if key not in config:
            close = get_close_matches(key, list(config), n=1)
            fail(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else ""))
        if isinstance(config[key], str):
            config[key] = value  # strings stay as typed, quotes or not
            continue
        try:
            parsed = literal_eval({"true": "True", "false": "False", "none": "None"}.get(value.lower(), value))
        except (ValueError, SyntaxError):
            fail(f"--{key}={value} is not a valid {type(config[key]).__name__}")
        if isinstance(config[key], float) and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        if config[key] is not None and parsed is not None and type(parsed) is not type(config[key]):
            fail(f"--{key}={value} is not a valid {type(config[key]).__name__}")
        config[key] = parsed


def load_checkpoint(path):
    """The checkpoint as a dict of plain values; a one-line error for anything that is not one."""
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train one first, e.g. `python train.py configs/method3.py configs/cpu.py`, "
             f"or point to one with --out_dir=DIR or --ckpt=PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # loading cannot run code
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or not from train.py")
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != CHECKPOINT_FORMAT:
        version = checkpoint.get("format_version") if isinstance(checkpoint, dict) else None
        fail(f"{path} has checkpoint format version {version!r}, but this sample.py reads version "
             f"{CHECKPOINT_FORMAT}; use the train.py/sample.py of the same project version")
    for key in ("model_args", "model", "tokenizer"):
        if key not in checkpoint:
            fail(f"{path} has no {key!r}; it was not written by train.py")
    return checkpoint


def pick_device_and_dtype(device, dtype):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return device, dtype


def encode_start(tokenizer, text, vocab_size):
    """The prompt as token ids, or a clear error if this tokenizer cannot represent it exactly."""
    if text == "":
        return [tokenizer.eot_token]
    try:
        ids = tokenizer.encode(text)
        exact = tokenizer.decode(ids) == text
    except (UnicodeError, ValueError):
        exact, ids = False, []
    if not exact or any(i >= vocab_size for i in ids):
        fail(f"the {tokenizer.name} tokenizer of this checkpoint cannot represent the start text exactly "
             f"(invalid Unicode such as a lone surrogate?); pass UTF-8 text")
    return ids


def find_checkpoint(out_dir):
    """out_dir/ckpt.pt, or else the newest checkpoint one folder down: the method configs write to
    out/method3, out/method3_cpu, ..., and `python sample.py` should read the latest run."""
    path = os.path.join(out_dir, "ckpt.pt")
    runs = sorted(glob.glob(os.path.join(glob.escape(out_dir), "*", "ckpt.pt")), key=os.path.getmtime)
    if os.path.exists(path) or not runs:
        return path
    print(f"sample.py: sampling from the newest run, {runs[-1]}", file=sys.stderr)
    return runs[-1]


def main(config):
    path = config["ckpt"] or find_checkpoint(config["out_dir"])
    checkpoint = load_checkpoint(path)
    device, dtype = pick_device_and_dtype(config["device"], config["dtype"])
    model_config = GPTConfig(**checkpoint["model_args"])
    model = GPT(model_config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        fail(f"{path}: the weights do not fit its model_args ({str(e).splitlines()[0]})")
    model.eval().to(device)
    if config["compile"]:
        model = torch.compile(model, dynamic=True)  # dynamic: the cached length grows every token
    try:
        tokenizer = get_tokenizer(checkpoint["tokenizer"]["name"])
    except DataError as e:
        fail(f"{path}: {e}")

    text = config["start"]
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the start text from {text[5:]}: {e}")
    prompt = encode_start(tokenizer, text, model_config.vocab_size)

    device_type = "cuda" if device.startswith("cuda") else "cpu" if device == "cpu" else device
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    top_k = config["top_k"] or None
    out = sys.stdout.buffer
    for k in range(config["num_samples"]):
        idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
        if text:
            out.write(text.encode("utf-8"))
        pending = []  # tokens not printed yet
        with autocast:
            for token in model.generate_stream(idx, config["max_new_tokens"], temperature=config["temperature"],
                                               top_k=top_k, top_p=config["top_p"], use_cache=config["use_cache"],
                                               generator=generator, vocab_size=tokenizer.vocab_size):
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
    config = {k: globals()[k] for k in config_keys}
    apply_overrides(sys.argv[1:], config)
    main(config)
