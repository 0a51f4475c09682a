"""
llm.c token shards, read back: the one definition of the format, and the training windows.

A dataset folder holds NAME_val_000000.bin, NAME_train_000001.bin, ... and meta.json. A shard is
exactly llm.c's / modded-nanogpt's: 256 int32 [20240520, 1, n_tokens, 0, ...], then n_tokens
uint16 tokens. prepare.py writes them; a folder of llm.c shards without meta.json reads as gpt2.

Training windows: a split is one long token stream. Window w is its tokens [w*T, w*T + T + 1), so
consecutive windows share one token and a window may run across documents and shards.
"""
import json
import os
import re

import numpy as np

from .sources import BUILTIN_DATASETS, DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")  # uint16: every token id must be < 65536
FORMAT_VERSION = 1  # of meta.json


def _error(path, problem, file=None):
    """A one-line DataError: the file, the problem, and the prepare.py command that (re-)makes the
    dataset at path, exact for a built-in one."""
    path = os.path.normpath(path)
    name = os.path.basename(path)
    sources, tokenizer = BUILTIN_DATASETS.get(name, ([f"SOURCE --name {name}"], None))
    try:  # a dataset of one's own: its meta.json, where readable, names its tokenizer
        tokenizer = tokenizer or json.load(open(os.path.join(path, "meta.json")))["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = "gpt2"
    flags = f"--tokenizer {tokenizer} --data-dir {os.path.dirname(path) or '.'}"
    flags += " --overwrite" if os.path.exists(path) else ""
    return DataError(f"{file or path}: {problem}; prepare it with `python prepare.py "
                     f"{' '.join(sources)} {flags}`")


def _open_shard(path, name):
    """A shard's tokens as a read-only memmap, once its header agrees with the file's size."""
    file = os.path.join(path, name)
    try:
        header, size = np.fromfile(file, dtype="<i4", count=HEADER_INTS), os.path.getsize(file)
    except OSError as e:
        raise _error(path, f"cannot read shard ({e.strerror or e})", file)
    if size < HEADER_BYTES:
        raise _error(path, f"{size} bytes is too short for a shard (header alone is "
                           f"{HEADER_BYTES})", file)
    magic, version, n_tokens = header[:3].tolist()
    expected = HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize
    if magic != SHARD_MAGIC:
        raise _error(path, f"not a token shard (magic {magic}, expected {SHARD_MAGIC})", file)
    if version != SHARD_VERSION:
        raise _error(path, f"shard version {version} is not supported (expected "
                           f"{SHARD_VERSION}, uint16 tokens)", file)
    if n_tokens <= 0 or size != expected:
        raise _error(path, f"header says {n_tokens} tokens ({expected} bytes) but the file has "
                           f"{size} bytes: the shard is truncated or corrupt", file)
    return np.memmap(file, TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def read_meta(path):
    """The dataset's meta.json as a dict (an llm.c shard folder gets one made from its headers)."""
    if not os.path.isdir(path):
        raise _error(path, "no such dataset folder")
    meta_file = os.path.join(path, "meta.json")
    if not os.path.exists(meta_file):
        return _llmc_meta(path)
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise _error(path, f"unreadable or corrupt ({type(e).__name__})", meta_file)
    try:  # JSON has no bytes: a shard name that basename() accepts is a str
        splits = [meta["splits"][split] for split in ("train", "val")]
        numbers = [meta["eot_token"], meta["vocab_size"]] + [
            info[key] for info in splits for key in ("tokens", "documents")]
        valid = (meta["format_version"] == FORMAT_VERSION and isinstance(meta["tokenizer"], str)
                 and all(isinstance(n, int) for n in numbers) and 0 < meta["vocab_size"] <= 1 << 16
                 and isinstance(meta["sources"], list) and all(info["shards"] and all(
                     os.path.basename(s) == s for s in info["shards"]) for info in splits))
    except (KeyError, TypeError):
        valid = False
    if not valid:
        raise _error(path, f"missing or malformed fields (format_version {FORMAT_VERSION}, "
                           f"tokenizer, vocab_size, eot_token, splits, sources)", meta_file)
    return meta


def _llmc_meta(path):
    """meta.json's fields for a folder of llm.c shards: gpt2, documents not counted."""
    names = sorted(os.listdir(path))
    shards = {split: [n for n in names if re.fullmatch(rf".+_{split}_\d{{6}}\.bin", n)]
              for split in ("train", "val")}
    missing = " and ".join(split for split in shards if not shards[split])
    if missing:
        raise _error(path, f"no meta.json, and no llm.c-style {missing} shards "
                           f"(NAME_train_NNNNNN.bin, NAME_val_NNNNNN.bin)")
    splits = {split: {"shards": names, "documents": None,
                      "tokens": sum(len(_open_shard(path, name)) for name in names)}
              for split, names in shards.items()}
    return {"format_version": FORMAT_VERSION, "tokenizer": "gpt2", "vocab_size": 50257,
            "eot_token": 50256, "splits": splits,
            "sources": [{"source": path, "type": "llm.c shards without meta.json"}]}


def open_split(path, split, meta=None):
    """The split's shards as read-only uint16 memmaps of their tokens, each checked: header, size,
    and every token id below vocab_size (one full read)."""
    meta = meta if meta is not None else read_meta(path)
    if split not in meta["splits"]:
        raise DataError(f"{path}: no split {split!r}; the dataset has {', '.join(meta['splits'])}")
    info, arrays = meta["splits"][split], []
    for name in info["shards"]:
        arrays.append(_open_shard(path, name))
        top = int(arrays[-1].max())
        if top >= meta["vocab_size"]:
            raise _error(path, f"token id {top} is out of range for the {meta['tokenizer']} "
                               f"vocabulary (vocab_size {meta['vocab_size']}): the shard belongs "
                               f"to another tokenizer or is corrupt", os.path.join(path, name))
    total = sum(len(a) for a in arrays)
    if total != info["tokens"]:
        raise _error(path, f"meta.json says the {split} split has {info['tokens']} tokens but "
                           f"its shards hold {total}")
    return arrays


# -----------------------------------------------------------------------------
# training windows

class TokenStream:
    """The shards of a split as one stream of tokens, cut into windows of T + 1 tokens."""

    def __init__(self, shards, T):
        self.shards, self.T = shards, T
        self.starts = np.cumsum([0] + [len(s) for s in shards])  # stream offset of each shard
        self.num_tokens = int(self.starts[-1])
        self.num_windows = max(0, (self.num_tokens - 1) // T)

    def window(self, w):
        """(T + 1,) tokens of window w, pieced together where it runs across shards."""
        start, end, pieces = w * self.T, w * self.T + self.T + 1, []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            pieces.append(self.shards[i][start - self.starts[i]:end - self.starts[i]])
            start, i = self.starts[i + 1], i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(self, window_ids):
        """(B, T + 1) int64 tokens of the given windows; train.py moves them to the device."""
        return np.stack([self.window(int(w)) for w in window_ids]).astype(np.int64)


class TrainOrder:
    """Epoch e visits every training window once, in a shuffled order seeded by (seed, e). A run's
    data position is the number of windows consumed so far, so resuming needs nothing but that."""

    def __init__(self, num_windows, seed):
        self.num_windows, self.seed = num_windows, seed
        self.epoch, self.order = None, None

    def ids(self, pos, count):
        """Window ids at positions pos .. pos+count-1 of the run, on into the next epochs."""
        out = []
        while count:
            epoch, i = divmod(pos, self.num_windows)
            if epoch != self.epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self.epoch, self.order = epoch, rng.permutation(self.num_windows)
            take = min(count, self.num_windows - i)
            out.append(self.order[i:i + take])
            pos, count = pos + take, count - take
        return np.concatenate(out)


def eval_window_ids(num_windows, count):
    """Validation windows spread evenly over the split: the same for every mode, seed, DDP setup
    and resume, so every run is scored alike."""
    count = min(count, num_windows)
    return np.linspace(0, num_windows - 1, count).round().astype(np.int64)


def unigram_entropy(shards, vocab_size, max_tokens=100_000_000):
    """Entropy in nats/token of the split's token frequencies (of its first max_tokens): the loss
    of a model that ignores context, the mark a model that learns anything must beat."""
    counts, left = np.zeros(vocab_size, dtype=np.int64), max_tokens
    for s in shards:
        counts += np.bincount(s[:left], minlength=vocab_size)
        left -= min(left, len(s))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
