"""
Stream any text corpus into llm.c-format token shards (the format: shards.py).

    python prepare.py                      # the offline default: Python's stdlib -> data/pystdlib
    python prepare.py --tokenizer byte     # same text as UTF-8 bytes       -> data/pystdlib_byte
    python prepare.py shakespeare          # tiny-shakespeare (downloads 1 MB, SHA-256 checked)
    python prepare.py notes/ 'books/*.txt' dump.jsonl.gz https://example.com/a.txt --name mix

Each file, JSONL record or URL is a document (sources.py), preceded by the end-of-text token as
in llm.c: a split's token stream reads EOT d1 EOT d2 ... Documents go to train or val by a hash of
their content: deterministic, disjoint, and duplicates never leak across the split. Everything is
written into a hidden temporary folder and renamed into place only when complete, so an
interrupted run never leaves a dataset that shards.read_meta would accept.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import ctypes
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
import types

import numpy as np

from harness.report import atomic_write, fsync_dir
from harness.shards import (FORMAT_VERSION, HEADER_BYTES, HEADER_INTS, SHARD_MAGIC, SHARD_VERSION,
                            TOKEN_DTYPE)
from harness.sources import (BUILTIN_DATASETS, DataError, dataset_name, iter_chunks,
                             read_documents, resolve_sources)

# -----------------------------------------------------------------------------
# defaults (the command line overrides them)
DATA_DIR = "data"
VAL_FRACTION = 0.05  # share of documents in val: 0.7M gpt2 tokens of pystdlib, 56 KB of shakespeare
SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shard size (200 MB of uint16)
CHUNK_BYTES = 1 << 18  # text per worker task: amortises inter-process traffic, evens out the load
TASKS_PER_WORKER = 4  # tasks in flight per worker: keeps every worker busy, memory stays bounded


# name -> (sources, tokenizer) that prepare() needs to build that built-in dataset, or None
builtin_dataset = BUILTIN_DATASETS.get


def ensure_builtin(data_dir, name):
    """Prepares the built-in dataset `name` (sources.BUILTIN_DATASETS) in data_dir when it is not
    there yet; any other missing dataset is left for shards.read_meta to report."""
    path = os.path.join(data_dir, name)
    if builtin_dataset(name) and not os.path.exists(path):
        print(f"prepare.py: dataset {name!r} is not prepared yet; preparing it in {path} now",
              flush=True)
        sources, tokenizer = builtin_dataset(name)
        # offline without tiktoken's files, the fix for train.py and compare.py is another dataset
        get_tokenizer(tokenizer, f"--dataset={dataset_name(sources, 'byte')}")
        prepare(sources, name=name, tokenizer=tokenizer, data_dir=data_dir)


# -----------------------------------------------------------------------------
# tokenizers

def get_tokenizer(name, byte_fix="--tokenizer byte"):
    """gpt2 (tiktoken, 50257 ids, EOT 50256) or byte (UTF-8 bytes 0-255, EOT 256). encode() is
    ordinary: the text "<|endoftext|>" is encoded as plain text, never as the EOT id. byte_fix: the
    caller's way to bytes, which the error names where tiktoken cannot load."""
    if name == "byte":
        return types.SimpleNamespace(
            name="byte", eot_token=256, vocab_size=257, decode=_byte_decode,
            encode=lambda text: list(text.encode("utf-8", "replace")))
    if name != "gpt2":
        raise DataError(f"unknown tokenizer {name!r}; choose gpt2 or byte")
    try:
        import tiktoken  # imported here: the byte tokenizer needs no dependency
        enc = tiktoken.get_encoding("gpt2")
    except ImportError:
        raise DataError(f"--tokenizer gpt2 needs tiktoken: `pip install tiktoken`, or use "
                        f"{byte_fix}")
    except Exception as e:  # tiktoken downloads its GPT-2 files on first use
        reason = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"cannot load tiktoken's gpt2 files ({type(e).__name__}: {reason}); "
                        f"connect to the internet once, set TIKTOKEN_CACHE_DIR to a cache of them, "
                        f"or use {byte_fix}")
    tok = types.SimpleNamespace(name="gpt2", encode=enc.encode_ordinary, decode=enc.decode,
                                eot_token=enc.eot_token, vocab_size=enc.n_vocab)
    if hasattr(enc, "encode_to_numpy"):  # tiktoken >= 0.8: ids straight into an array, no list
        # no special tokens allowed (the default) and none disallowed: exactly encode_ordinary
        tok.encode_numpy = lambda text: enc.encode_to_numpy(text, disallowed_special=())
    return tok


def _byte_decode(ids):
    ids = np.asarray(ids, dtype=np.int64).ravel()
    bad = ids[(ids < 0) | (ids > 256)]
    if bad.size:
        raise DataError(f"token id {bad[0]} is outside the byte vocabulary (0-256)")
    # EOT (256) splits the ids into byte runs; each run decodes on its own, EOT shows as in gpt2
    runs = np.split(ids, np.flatnonzero(ids == 256))  # each run but the first starts with EOT
    return "<|endoftext|>".join(bytes(r[r != 256].astype(np.uint8)).decode("utf-8", "replace")
                                for r in runs)


# -----------------------------------------------------------------------------
# tokenizing, in worker processes (or in this process when workers == 1)

def _init_worker(tokenizer, val_fraction, pool=True):
    global _tokenizer, _val_threshold  # this process's, for encode_chunk
    if pool:  # Ctrl-C is the main process's: it stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _tokenizer = get_tokenizer(tokenizer)
    _val_threshold = int(val_fraction * 2 ** 64)


def encode_chunk(documents):
    """Tokenizes a list of documents: raw bytes, or the path of a plain file to read here. Returns
    each split's token stream (EOT before every document) and counts. The split of a document
    depends only on its content, so any chunking gives the same output."""
    streams = {split: [np.zeros(0, TOKEN_DTYPE)] for split in ("train", "val")}  # never empty
    counts = {"train": 0, "val": 0, "empty": 0, "replaced_bytes": 0, "replaced_documents": 0}
    eot = np.array([_tokenizer.eot_token], dtype=TOKEN_DTYPE)
    encode = getattr(_tokenizer, "encode_numpy", _tokenizer.encode)  # an array, or a list of ids
    byte = _tokenizer.name == "byte"  # its ids are the document's own bytes: nothing to encode
    for data in documents:
        if isinstance(data, str):
            [(data, _)] = read_documents("file", data)  # a plain file is one document
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # rare: replace each invalid run by U+FFFD, count its bytes
            escaped = data.decode("utf-8", "surrogateescape")  # one surrogate per invalid byte
            counts["replaced_bytes"] += len(re.findall("[\udc80-\udcff]", escaped))
            counts["replaced_documents"] += 1
            text = data.decode("utf-8", "replace")
            data = text.encode("utf-8")
        if not data:
            counts["empty"] += 1
            continue
        content_hash = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        split = "val" if content_hash < _val_threshold else "train"
        ids = np.frombuffer(data, np.uint8) if byte else np.asarray(encode(text))
        if ids.size and ids.max() >= _tokenizer.vocab_size:  # below it, an id fits uint16
            raise DataError(f"the {_tokenizer.name} tokenizer produced token id {ids.max()}, "
                            f"beyond its vocab_size {_tokenizer.vocab_size}")
        streams[split] += [eot, ids.astype(TOKEN_DTYPE)]
        counts[split] += 1
    return {split: np.concatenate(parts) for split, parts in streams.items()}, counts


def _map_ordered(fn, items, workers, initargs):
    """fn over items, results in order, at most TASKS_PER_WORKER tasks per worker in flight (unlike
    Pool.imap, which reads all its input ahead): memory stays bounded. Not multiprocessing.Pool:
    its handler thread spins while big results wait in its pipe, taking CPU from the workers."""
    if workers == 1:
        _init_worker(*initargs, pool=False)
        yield from map(fn, items)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_worker,
                                                  initargs=initargs)
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= TASKS_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except concurrent.futures.BrokenExecutor:
        raise DataError("a tokenizer worker process died (out of memory, or killed); try fewer "
                        "--workers") from None
    finally:  # on an error or Ctrl-C, drop the queued tasks; running ones end within a chunk's time
        pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# writing

class ShardWriter:
    """Streams one split's tokens to disk, shard_tokens per shard. A shard's header stays zero (no
    reader accepts it) until the shard is complete and gets its real header and an fsync."""

    def __init__(self, folder, prefix, shard_tokens, numbers):
        self.folder, self.prefix, self.shard_tokens = folder, prefix, shard_tokens
        self.numbers = numbers  # an iterator of shard numbers, shared with the other split
        self.file, self.count = None, 0  # the shard being written, its tokens so far
        self.shards, self.tokens = [], 0  # the shards begun, the tokens of the finished ones

    def write(self, tokens):
        while len(tokens):
            if self.file is None:
                self.shards.append(f"{self.prefix}_{next(self.numbers):06d}.bin")
                self.file = open(os.path.join(self.folder, self.shards[-1]), "wb")
                self.file.write(bytes(HEADER_BYTES))
            part = tokens[:self.shard_tokens - self.count]
            self.file.write(memoryview(part))
            self.count += len(part)
            tokens = tokens[len(part):]
            if self.count == self.shard_tokens:
                self.close()

    def close(self, complete=True):
        """Finishes the shard being written, if any; complete=False (on an error) only closes it."""
        if self.file is not None and complete:
            self.file.seek(0)  # the header's first three ints; the others stay zero
            self.file.write(np.array([SHARD_MAGIC, SHARD_VERSION, self.count], "<i4").tobytes())
            self.file.flush()
            os.fsync(self.file.fileno())
        if self.file is not None:
            self.file.close()
        self.file, self.tokens, self.count = None, self.tokens + self.count, 0


def _clean_up_killed_runs(data_dir):
    """What a killed run (its process is gone) left: its temporary folder goes, and a dataset it had
    moved aside to --overwrite goes back to its place if the new one never got there."""
    for folder in glob.glob(os.path.join(glob.escape(data_dir), ".*.*-*")):
        name, _, suffix = os.path.basename(folder)[1:].rpartition(".")
        kind, _, pid = suffix.partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process is there
            continue
        except ProcessLookupError:
            pass
        except OSError:
            continue  # alive, owned by someone else
        if kind == "old" and not os.path.exists(os.path.join(data_dir, name)):
            os.replace(folder, os.path.join(data_dir, name))
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _with_progress(results, totals, total_bytes):
    """results, passed through, while a progress line goes to stderr: at most once a second on a
    terminal (redrawn in place), once every 10 s otherwise."""
    tty = sys.stderr.isatty()
    start = last = time.time()
    for result in results:
        yield result
        if time.time() - last >= (1 if tty else 10):
            last = time.time()
            done, rate = totals["bytes_in"], totals["bytes_in"] / 1e6 / (last - start)
            line = (f"prepare: {totals['train'] + totals['val']:,} docs | {done / 1e6:,.1f} MB | "
                    f"{totals['tokens'] / 1e6:,.2f}M tokens | {rate:,.1f} MB/s")
            if total_bytes:
                line += f" | ETA {max(total_bytes - done, 0) / 1e6 / max(rate, 1e-9):,.0f} s"
            print("\r" + line + "\x1b[K" if tty else line, end="" if tty else "\n",
                  file=sys.stderr, flush=True)
    if tty and last > start:
        print(file=sys.stderr)  # ends the line being redrawn; the summary follows


def prepare(sources, name=None, tokenizer="gpt2", data_dir=DATA_DIR, val_fraction=VAL_FRACTION,
            shard_tokens=SHARD_TOKENS, workers=None, overwrite=False, quiet=False):
    """Tokenizes `sources` into data_dir/name (shards + meta.json) and returns that path. On bad
    input: a one-line DataError, nothing written, any existing dataset untouched."""
    as_list = [sources] if isinstance(sources, (str, os.PathLike)) else sources or []
    sources = [os.fspath(s) for s in as_list] or ["pystdlib"]
    name = name or dataset_name(sources, tokenizer)
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise DataError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (no '/', "
                        f"not starting with '.')")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} must be between 0 and 1 (exclusive): both "
                        f"splits need documents")
    if not 0 < shard_tokens < 2 ** 31:
        raise DataError(f"shard_tokens {shard_tokens} must be between 1 and {2 ** 31 - 1} (int32)")
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count())
    if workers < 1:
        raise DataError(f"workers {workers} must be at least 1")
    path = os.path.join(data_dir, name)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    if os.path.isdir(data_dir):
        _clean_up_killed_runs(data_dir)
    if os.path.exists(path) and not overwrite:
        raise DataError(f"{path} already exists; pass --overwrite to replace it, or choose "
                        f"another --name")
    tok = get_tokenizer(tokenizer)  # fails early, e.g. when tiktoken cannot fetch its files
    if tok.vocab_size > 1 << 16:
        raise DataError(f"the {tokenizer} tokenizer has {tok.vocab_size} ids, too many for uint16")
    entries, described, total_bytes = resolve_sources(sources)

    start = time.time()
    tmp = os.path.join(data_dir, f".{name}.tmp-{os.getpid()}")
    old = os.path.join(data_dir, f".{name}.old-{os.getpid()}")  # what --overwrite replaces
    later = itertools.count(2)  # llm.c numbering: val 000000, train 000001, then both count on
    writers = {split: ShardWriter(tmp, f"{name}_{split}", shard_tokens, itertools.chain([n], later))
               for split, n in (("val", 0), ("train", 1))}
    totals = collections.Counter()  # documents per split, tokens, input bytes, ...
    chunks = iter_chunks(entries, totals, CHUNK_BYTES)
    results = _map_ordered(encode_chunk, chunks, workers, (tokenizer, val_fraction))
    shown = results if quiet else _with_progress(results, totals, total_bytes)
    try:
        os.makedirs(data_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with contextlib.closing(results):  # closing stops the worker pool on any error
            for tokens, counts in shown:
                for split in ("val", "train"):
                    writers[split].write(tokens[split])
                totals.update(counts)
                totals["tokens"] += sum(len(t) for t in tokens.values())
        for writer in writers.values():
            writer.close()
        documents = totals["train"] + totals["val"]
        if documents == 0:
            raise DataError(f"empty corpus: {' '.join(sources)} holds no text ({totals['empty']} "
                            "empty documents); point prepare.py at files that hold text")
        for split, other in (("val", "train"), ("train", "val")):
            if totals[split] == 0:
                raise DataError(f"the {split} split is empty: all {documents} document(s) went "
                                f"to {other} (each file or JSONL record is one document); add "
                                f"documents or change --val-fraction")
        meta = dict(
            format_version=FORMAT_VERSION, name=name, tokenizer=tokenizer,
            vocab_size=tok.vocab_size, eot_token=tok.eot_token,
            shard_format={"header": f"{HEADER_INTS} x int32: magic {SHARD_MAGIC}, version "
                                    f"{SHARD_VERSION}, n_tokens",
                          "dtype": "uint16", "eot": "before every document"},
            shard_tokens=shard_tokens, val_fraction=val_fraction,
            split_rule="val if blake2b-64 of the document's UTF-8 bytes (little-endian) < "
                       "val_fraction * 2**64",
            splits={split: {"shards": writers[split].shards, "tokens": writers[split].tokens,
                            "documents": totals[split]} for split in ("train", "val")},
            sources=described, documents=documents, empty_documents_skipped=totals["empty"],
            invalid_utf8_bytes_replaced=totals["replaced_bytes"],
            documents_with_invalid_utf8=totals["replaced_documents"])
        atomic_write(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=2) + "\n")
        if overwrite and os.path.exists(path):  # the old dataset goes once the new one is in place
            os.replace(path, old)
        os.replace(tmp, path)  # fails if another run has put a dataset there since the start
        fsync_dir(data_dir)
    except BaseException as e:  # errors and Ctrl-C alike: nothing half-written stays behind
        for writer in writers.values():
            writer.close(complete=False)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # reading errors are DataErrors already: a write failed
            message = f"cannot write {path}: {e.strerror or e} (no dataset was written)"
            raise DataError(message) from e
        raise
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.lexists(old):
        os.remove(old)
    if not quiet:
        _print_summary(path, meta, time.time() - start, totals["bytes_in"])
    return path


def _print_summary(path, meta, seconds, bytes_in):
    print(f"prepare.py: wrote {path} ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}) "
          f"from {bytes_in / 1e6:,.1f} MB in {seconds:.1f} s")
    for split, s in meta["splits"].items():
        print(f"  {split:5s} {s['tokens']:>13,} tokens  {s['documents']:>9,} documents  "
              f"{len(s['shards'])} shard(s)")
    if meta["empty_documents_skipped"] or meta["invalid_utf8_bytes_replaced"]:
        print(f"  {meta['empty_documents_skipped']:,} empty documents skipped; "
              f"{meta['invalid_utf8_bytes_replaced']:,} invalid UTF-8 bytes replaced by U+FFFD in "
              f"{meta['documents_with_invalid_utf8']:,} documents")


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = parser.add_argument
    arg("sources", nargs="*", metavar="SOURCE", help="default: pystdlib")
    arg("--name", help="dataset name (default: the source's, + _byte for --tokenizer byte)")
    arg("--tokenizer", default="gpt2", choices=["gpt2", "byte"], help="default: %(default)s")
    arg("--data-dir", default=DATA_DIR, help="default: %(default)s")
    arg("--val-fraction", type=float, default=VAL_FRACTION, help="default: %(default)s")
    arg("--shard-tokens", type=int, default=SHARD_TOKENS, help="default: %(default)s")
    arg("--workers", type=int, help="tokenizing processes (default: all cores)")
    arg("--overwrite", action="store_true", help="replace an existing dataset when done")
    arg("--quiet", action="store_true", help="no progress or summary")
    parser.error = lambda msg: sys.exit(f"prepare.py: {msg} (see python prepare.py --help)")
    # glibc raises its mmap threshold once a big buffer is freed, and the heap then grows with the
    # corpus (48 MiB peak for 10 MB of text, 103 MiB for 200 MB); pinned, memory stays flat
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to pin
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    try:
        prepare(**vars(parser.parse_args(argv)))
    except DataError as e:
        sys.exit(f"prepare.py: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare.py: interrupted; nothing was written")


if __name__ == "__main__":
    main()
