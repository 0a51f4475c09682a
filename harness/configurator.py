"""
Config files and --key=value flags onto a script's defaults, after nanoGPT's configurator.py, and
the one resolver of device="auto" and dtype="auto".

A script's config is its literal globals above its first def or class (`n_layer = 12`): defaults()
reads them from the file, so compare.py and bench.py see train.py's defaults without running it.
Arguments apply in order: a config file is Python that sees the config so far, so an overlay can
build on it (out_dir = out_dir + "_cpu"); a flag --key=value takes the default's type.
"""
import ast
import contextlib
import dataclasses
import difflib
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
RENAMED = {"layer_weight_lr_mult": "mixing_lr_mult"}  # old key -> new: refused with the new name


class ConfigError(Exception):
    """A bad config file or flag; the scripts print it as one line."""


def defaults(script):
    """{name: value} of the literal assignments in a script before its first def or class."""
    with open(script, encoding="utf-8") as f:
        tree = ast.parse(f.read(), script)
    config = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            break
        if isinstance(node, ast.Assign) and [type(t) for t in node.targets] == [ast.Name]:
            name = node.targets[0].id
            with contextlib.suppress(ValueError):  # not a literal: not a config key
                value = ast.literal_eval(node.value)
                if not name.startswith("_") and isinstance(value, (bool, int, float, str)):
                    config[name] = value
    return config


def load(argv, defaults, script="train.py", parsers=None):
    """argv: config files and --key=value flags applied in order -> a copy of defaults with them.
    parsers: {key: function} for keys whose values are not just of the default's type (a mode's
    number or name): it returns the value, or raises ValueError."""
    parsers = parsers or {}
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")  # partition: a value may contain "="
            if not eq:
                raise ConfigError(f"flag {arg!r} needs a value: --{key}=VALUE")
            check_key(key, arg, defaults, script)
            config[key] = check_value(key, text, arg, defaults[key], parsers.get(key), flag=True)
        else:
            for key, value in read_file(arg, config).items():
                check_key(key, arg, defaults, script)
                config[key] = check_value(key, value, arg, defaults[key], parsers.get(key))
    return config


def read_file(path, config):
    """Runs a config file -> its public global names. It sees the config so far."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (flags look like --key=value)")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} ({type(e).__name__}); "
                          "save it as UTF-8 text") from None
    namespace = dict(config)
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:
        where = f"{path}:{e.lineno}" if isinstance(e, SyntaxError) else path
        raise ConfigError(f"config file {where} failed: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def check_key(key, source, defaults, script):
    if key in RENAMED and RENAMED[key] in defaults:
        raise ConfigError(f"{key} in {source} is now called {RENAMED[key]}; use that name")
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = (f"did you mean {close[0]!r}?" if close
                else f"the keys are the globals at the top of {script}")
        raise ConfigError(f"unknown config key {key!r} in {source}; {hint}")


def check_value(key, value, source, default, parse=None, flag=False):
    """A value of the default's type, from a file or from the text of a flag (source): in a file an
    int may stand for a float, a bool for nothing else. parse, if given, reads the value instead."""
    if parse is not None:
        try:
            return parse(value)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    kind = type(default)
    if flag:
        try:
            return {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise ConfigError(f"{source}: expected {TYPE_NAMES[kind]}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{source} sets {key} = {value!r}: expected {TYPE_NAMES[kind]}")
    return value


def check_train(config):
    """train.py's value checks, which would otherwise fail deep inside torch."""
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval",
                "gradient_accumulation_steps", "eval_iters", "log_interval", "ckpt_interval"):
        if config[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {config[key]}")
    for key in ("learning_rate", "min_lr", "warmup_iters", "weight_decay", "grad_clip",
                "mixing_lr_mult"):
        if config[key] < 0:
            raise ConfigError(f"{key} must be 0 or more, got {config[key]}")
    if not 0 <= config["dropout"] < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {config['dropout']}")
    if config["n_embd"] % config["n_head"]:
        raise ConfigError(f"n_embd ({config['n_embd']}) must be divisible by "
                          f"n_head ({config['n_head']})")
    if config["init_from"] not in ("scratch", "resume"):
        raise ConfigError(f"init_from must be 'scratch' or 'resume', got {config['init_from']!r}")
    if config["dtype"] not in ("auto", *DTYPES):
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {config['dtype']!r}")
    if config["max_epochs"] <= 0 and config["max_iters"] <= 0:
        raise ConfigError("set max_iters or max_epochs to a positive budget")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    if config["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps ({config['gradient_accumulation_steps']}) "
                          f"must be a multiple of the number of processes ({world_size})")


def model_args(config, config_class):
    """The model's options: each field of config_class (model.GPTConfig) that the config has a key
    for. The class's own checks run now, before any data is read: a ValueError is a ConfigError."""
    args = {f.name: config[f.name] for f in dataclasses.fields(config_class) if f.name in config}
    try:
        config_class(**args)
    except ValueError as e:
        raise ConfigError(e) from None
    return args


def resolve_device(name, ddp_rank=None):
    """auto: cuda, else mps, else cpu; any other name as given, once checked. Under DDP
    (ddp_rank: the local rank), cuda means each process's own GPU, cuda:LOCAL_RANK. A CUDA device
    is made the current one: its RNG state, memory stats and capability are the ones read."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}, but this torch sees no CUDA GPU; "
                          "use --device=cpu (or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda"):
        index = ddp_rank if ddp_rank is not None else torch.device(name).index
        name = f"cuda:{torch.cuda.current_device() if index is None else index}"
        torch.cuda.set_device(name)
    return name


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: full-speed bf16 matmuls. Without them, CPU bf16 is emulated and slow."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name, device_type):
    """auto: bfloat16 where native, float16 on older GPUs (with a GradScaler), else float32."""
    if name not in ("auto", *DTYPES):
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    if name != "auto":
        return name
    if device_type == "cuda":  # Ampere (8.x) and newer do bf16 natively
        return "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"
    return "bfloat16" if device_type == "cpu" and cpu_has_native_bf16() else "float32"
