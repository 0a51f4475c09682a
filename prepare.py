"""
Stream any text corpus into llm.c-format token shards, and read them back.

    python prepare.py                           # the offline default: Python's stdlib -> data/pystdlib
    python prepare.py --tokenizer byte          # same text as UTF-8 bytes       -> data/pystdlib_byte
    python prepare.py shakespeare               # tiny-shakespeare (downloads 1 MB, SHA-256 checked)
    python prepare.py notes/ 'books/*.txt' dump.jsonl.gz https://example.com/a.txt --name mix

Each file, JSONL record (its "text" field) or downloaded URL is one document. Every document is
preceded by the end-of-text token, as in llm.c, so a split's token stream reads EOT d1 EOT d2 ...
Documents go to train or val by a hash of their content: deterministic, disjoint, and duplicates
never leak across the split.

A shard is exactly llm.c's / modded-nanogpt's: 256 int32 header [20240520, 1, n_tokens, 0, ...]
followed by n_tokens uint16 tokens. A dataset folder holds NAME_val_000000.bin, NAME_train_000001.bin,
... and meta.json. Everything is written into a hidden temporary folder and renamed into place only
when complete, so an interrupted run never leaves a dataset that read_meta/open_split would accept.
"""
import argparse
import codecs
import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import glob
import gzip
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import sys
import sysconfig
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np

# -----------------------------------------------------------------------------
# defaults (the command line overrides them)
DATA_DIR = "data"
VAL_FRACTION = 0.05  # share of documents in val: ~0.7M gpt2 tokens of the stdlib, ~56 KB of shakespeare
SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shard size (200 MB of uint16)
CHUNK_BYTES = 1 << 18  # text per worker task: amortises inter-process traffic, evens out the workers' load
TASKS_PER_WORKER = 4  # tasks in flight per worker: keeps every worker busy while memory stays bounded

# the shard format, exactly llm.c's
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")  # uint16: every token id must be < 65536
FORMAT_VERSION = 1  # of meta.json

EOT_TEXT = "<|endoftext|>"  # how decode() shows the end-of-text token, for both tokenizers
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/"
                   "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT = 60  # seconds without data before a download gives up

# dataset name -> (sources, tokenizer): the corpora train.py may prepare on its own when missing
BUILTIN_DATASETS = {
    "pystdlib": (["pystdlib"], "gpt2"),
    "pystdlib_byte": (["pystdlib"], "byte"),
    "shakespeare": (["shakespeare"], "gpt2"),
    "shakespeare_byte": (["shakespeare"], "byte"),
}


class DataError(Exception):
    """Bad input or a bad dataset; the message is one line that names the file and the fix."""


def builtin_dataset(name):
    """(sources, tokenizer) that prepare() needs to build the built-in dataset `name`, or None."""
    return BUILTIN_DATASETS.get(name)


# -----------------------------------------------------------------------------
# tokenizers


def get_tokenizer(name):
    """gpt2 (tiktoken, 50257 ids, EOT 50256) or byte (UTF-8 bytes 0-255, EOT 256). encode() is ordinary:
    the text "<|endoftext|>" is encoded as plain text, never as the EOT id."""
    if name == "byte":
        return types.SimpleNamespace(name="byte", encode=lambda text: list(text.encode("utf-8", "replace")),
                                     decode=_byte_decode, eot_token=256, vocab_size=257)
    if name == "gpt2":
        try:
            import tiktoken  # imported here: the byte tokenizer needs no dependency
            enc = tiktoken.get_encoding("gpt2")
        except ImportError:
            raise DataError("the gpt2 tokenizer needs tiktoken: `pip install tiktoken`, or use --tokenizer byte")
        except Exception as e:  # tiktoken downloads its GPT-2 files on first use
            reason = (str(e).splitlines() or [""])[0][:200]
            raise DataError(f"cannot load tiktoken's gpt2 files ({type(e).__name__}: {reason}); connect to the "
                            f"internet once, set TIKTOKEN_CACHE_DIR to a cache of them, or use --tokenizer byte")
        tok = types.SimpleNamespace(name="gpt2", encode=enc.encode_ordinary, decode=enc.decode,
                                    eot_token=enc.eot_token, vocab_size=enc.n_vocab)
        if hasattr(enc, "encode_to_numpy"):  # tiktoken >= 0.8: ids straight into an array, no Python list
            # with no special tokens allowed and none disallowed, this is exactly encode_ordinary
            tok.encode_numpy = lambda text: enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return tok
    raise DataError(f"unknown tokenizer {name!r}; choose gpt2 or byte")


def _byte_decode(ids):
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() > 256):
        raise DataError(f"token id {int(ids.max() if ids.max() > 256 else ids.min())} is outside the byte "
                        f"vocabulary (0-256)")
    # EOT (256) splits the ids into byte runs; each run decodes on its own, EOT shows as EOT_TEXT
    runs = np.split(ids, np.flatnonzero(ids == 256))
    texts = [bytes(runs[0].astype(np.uint8)).decode("utf-8", "replace")]
    texts += [bytes(run[1:].astype(np.uint8)).decode("utf-8", "replace") for run in runs[1:]]
    return EOT_TEXT.join(texts)


# -----------------------------------------------------------------------------
# reader: meta.json + shards as memmaps (used by train.py and sample.py)


def _prepare_hint(path):
    name = os.path.basename(os.path.normpath(path))
    builtin = builtin_dataset(name)
    if builtin:
        sources, tokenizer = builtin
        flags = "" if tokenizer == "gpt2" else f" --tokenizer {tokenizer}"
        command = f"python prepare.py {' '.join(sources)}{flags} --data-dir {os.path.dirname(path) or '.'}"
    else:
        command = f"python prepare.py SOURCE --name {name} --data-dir {os.path.dirname(path) or '.'}"
    return f"prepare it with `{command}`"


def _read_header(file):
    """Validates a shard's header against its file size; returns its token count."""
    try:
        with open(file, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = os.path.getsize(file)
    except OSError as e:
        raise DataError(f"{file}: cannot read shard ({e.strerror or e})")
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{file}: {len(raw)} bytes is too short for a shard (header alone is {HEADER_BYTES}); "
                        f"re-run prepare.py --overwrite")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{file}: not a token shard (magic {header[0]}, expected {SHARD_MAGIC}); "
                        f"re-run prepare.py --overwrite")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{file}: shard version {header[1]} is not supported (expected {SHARD_VERSION}, "
                        f"uint16 tokens)")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize
    if n_tokens <= 0 or size != expected:
        raise DataError(f"{file}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
                        f"the shard is truncated or corrupt, re-run prepare.py --overwrite")
    return n_tokens


def read_meta(path):
    """The dataset's meta.json as a dict. A folder of llm.c / modded-nanogpt shards (NAME_train_000001.bin,
    NAME_val_000000.bin, no meta.json) gets a gpt2 meta synthesized from the shard headers."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such dataset folder; {_prepare_hint(path)}")
    meta_file = os.path.join(path, "meta.json")
    if not os.path.exists(meta_file):
        return _llmc_meta(path)
    fix = f"re-create it with `python prepare.py ... --name {os.path.basename(os.path.normpath(path))} --overwrite`"
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_file}: unreadable or corrupt ({type(e).__name__}); {fix}")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"{meta_file}: format_version {version!r} is not {FORMAT_VERSION}; {fix}")
    try:
        assert isinstance(meta["tokenizer"], str) and isinstance(meta["eot_token"], int)
        assert isinstance(meta["vocab_size"], int) and 0 < meta["vocab_size"] <= 1 << 16
        for split in ("train", "val"):
            info = meta["splits"][split]
            assert isinstance(info["tokens"], int) and isinstance(info["documents"], int)
            assert all(isinstance(s, str) and os.path.basename(s) == s for s in info["shards"])
        assert isinstance(meta["sources"], list)
    except (AssertionError, KeyError, TypeError):
        raise DataError(f"{meta_file}: missing or malformed fields (tokenizer, vocab_size, eot_token, splits, "
                        f"sources); {fix}")
    return meta


def _llmc_meta(path):
    shards = {"train": [], "val": []}
    for name in sorted(os.listdir(path)):
        match = re.fullmatch(r".+_(train|val)_\d{6}\.bin", name)
        if match:
            shards[match.group(1)].append(name)
    if not shards["train"] or not shards["val"]:
        missing = " and ".join(s for s in ("train", "val") if not shards[s])
        raise DataError(f"{path}: no meta.json, and no llm.c-style {missing} shards (NAME_train_NNNNNN.bin, "
                        f"NAME_val_NNNNNN.bin); {_prepare_hint(path)}")
    splits = {}
    for split, names in shards.items():
        tokens = sum(_read_header(os.path.join(path, name)) for name in names)
        splits[split] = {"shards": names, "tokens": tokens, "documents": None}  # unknown without a full scan
    return {"format_version": FORMAT_VERSION, "tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256,
            "splits": splits, "sources": [{"source": path, "type": "llm.c shards without meta.json"}]}


def open_split(path, split, meta=None):
    """The split's shards as read-only uint16 memmaps of their tokens (headers skipped), each validated:
    magic, version, token count against file size, and every token id below vocab_size (one full read)."""
    meta = meta if meta is not None else read_meta(path)
    if split not in meta["splits"]:
        raise DataError(f"{path}: no split {split!r}; the dataset has {', '.join(meta['splits'])}")
    info = meta["splits"][split]
    if not info["shards"]:
        raise DataError(f"{path}: the {split} split has no shards; {_prepare_hint(path)}")
    arrays = []
    for name in info["shards"]:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise DataError(f"{file}: shard listed in meta.json is missing; re-run prepare.py --overwrite")
        n_tokens = _read_header(file)
        tokens = np.memmap(file, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
        top = int(tokens.max())
        if top >= meta["vocab_size"]:
            raise DataError(f"{file}: token id {top} is out of range for the {meta['tokenizer']} vocabulary "
                            f"(vocab_size {meta['vocab_size']}); the shard belongs to another tokenizer or is corrupt")
        arrays.append(tokens)
    total = sum(len(a) for a in arrays)
    if total != info["tokens"]:
        raise DataError(f"{path}: meta.json says the {split} split has {info['tokens']} tokens but its shards hold "
                        f"{total}; re-run prepare.py --overwrite")
    return arrays


# -----------------------------------------------------------------------------
# sources: names on the command line -> documents (raw UTF-8 bytes)


def _is_url(source):
    return source.startswith(("http://", "https://"))


def dataset_name(sources, tokenizer):
    """Default dataset name: the source's stem, plus "_byte" for the byte tokenizer (pystdlib, pystdlib_byte)."""
    sources = list(sources) or ["pystdlib"]
    if len(sources) > 1:
        raise DataError(f"{len(sources)} sources: give the dataset a name with --name NAME")
    source = sources[0]
    if source in ("pystdlib", "shakespeare"):
        stem = source
    elif _is_url(source):
        parsed = urllib.parse.urlparse(source)
        stem = os.path.basename(parsed.path.rstrip("/")) or parsed.hostname or "url"
    elif glob.has_magic(source):
        stem = os.path.basename(os.path.normpath(source.split("*")[0].split("?")[0].split("[")[0])) or "corpus"
    else:
        stem = os.path.basename(os.path.normpath(source))
    stem = re.sub(r"\.gz$", "", stem)
    stem = os.path.splitext(stem)[0] or stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "corpus"
    return stem + ("_byte" if tokenizer == "byte" else "")


def _stdlib_files():
    """Every .py file of the running Python's standard library (not site-packages), in sorted path order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def _folder_files(folder):
    """Every file under folder, sorted by path; hidden files and folders (.git, ...) are skipped."""
    files = []
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        files += [os.path.join(parent, n) for n in names if not n.startswith(".")]
    return sorted(files)


def resolve_sources(sources):
    """Checks every source before anything is written. Returns (entries, described, total_bytes):
    entries are ("file", path) / ("url", url) / ("shakespeare", url) to read in order, described is the
    list that goes into meta.json, total_bytes the input size when known (for an ETA) or None."""
    entries, described, total = [], [], 0
    for source in sources:
        if source == "pystdlib":
            root, files = _stdlib_files()
            if not files:
                raise DataError(f"pystdlib: no .py files under {root}; this Python ships without its standard "
                                f"library sources, prepare a local folder instead")
            entries += [("file", f) for f in files]
            total = None if total is None else total + sum(os.path.getsize(f) for f in files)
            described.append({"source": "pystdlib", "type": "python standard library .py files",
                              "python": platform.python_version(), "path": root, "files": len(files)})
        elif source == "shakespeare":
            entries.append(("shakespeare", SHAKESPEARE_URL))
            described.append({"source": "shakespeare", "type": "tiny-shakespeare, one document per passage",
                              "url": SHAKESPEARE_URL, "sha256": SHAKESPEARE_SHA256})
            total = None
        elif _is_url(source):
            entries.append(("url", source))
            described.append({"source": source, "type": "url"})
            total = None
        else:
            if os.path.isdir(source):
                files, kind = _folder_files(source), "folder"
            elif os.path.exists(source):
                files, kind = [source], "file"
            elif glob.has_magic(source):
                files, kind = [], "glob"
                for match in sorted(glob.glob(source, recursive=True)):
                    files += _folder_files(match) if os.path.isdir(match) else [match]
                if not files:
                    raise DataError(f"{source}: no files match this pattern")
            else:
                raise DataError(f"{source}: no such file or folder (nor pystdlib, shakespeare or an http(s) URL)")
            if not files:
                raise DataError(f"{source}: the folder holds no files")
            entries += [("file", f) for f in files]
            described.append({"source": source, "type": kind, "files": len(files)})
            if total is not None:
                if any(f.endswith(".gz") for f in files):
                    total = None  # compressed sizes say little about the text inside
                else:
                    total += sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    return entries, described, total


_replaced_bytes = 0  # invalid UTF-8 bytes replaced by U+FFFD in this process (see _count_replaced)


def _count_replaced(err):
    """Decoding error handler: like errors="replace", and counts what it replaces."""
    global _replaced_bytes
    _replaced_bytes += err.end - err.start
    return "\ufffd", err.end


def _raw_surrogates(err):
    """Encoding error handler that gives back the bytes a JSONL line had: surrogateescape'd bytes return as
    they were, and a lone surrogate ("\\ud800" in JSON) becomes the invalid byte 0xFF. The worker then
    replaces and counts them like any invalid UTF-8: one U+FFFD each."""
    raw = bytes(ord(c) - 0xDC00 if 0xDC80 <= ord(c) <= 0xDCFF else 0xFF for c in err.object[err.start:err.end])
    return raw, err.end


codecs.register_error("prepare.raw", _raw_surrogates)
codecs.register_error("prepare.count", _count_replaced)


def _download(url, label):
    try:
        opener = urllib.request.build_opener()  # a fresh opener reads the proxy settings of this moment
        return opener.open(url, timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot download {label}: HTTP {e.code} {e.reason}")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot download {label}: {getattr(e, 'reason', None) or e}")


def _open_input(kind, where):
    """A binary stream for a local file or URL; .gz is decompressed on the fly."""
    if kind == "file":
        try:
            stream = open(where, "rb")
        except OSError as e:
            raise DataError(f"{where}: cannot read ({e.strerror or e})")
    else:
        stream = _download(where, where)
    name = urllib.parse.urlparse(where).path if kind == "url" else where
    return gzip.GzipFile(fileobj=stream, mode="rb") if name.lower().endswith(".gz") else stream, stream


def _read_documents(kind, where):
    """Yields the documents of one file or URL as raw UTF-8 bytes: the whole content, or one per JSONL record."""
    stream, raw_stream = _open_input(kind, where)
    name = urllib.parse.urlparse(where).path if kind == "url" else where
    name = re.sub(r"\.gz$", "", name.lower())
    try:
        with raw_stream, stream:
            if not name.endswith(".jsonl"):
                data = stream.read()
                yield data, len(data)
                return
            for line_number, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:  # invalid UTF-8 travels as surrogates, to be replaced and counted by the worker
                    record = json.loads(line.decode("utf-8", "surrogateescape"))
                except ValueError as e:
                    raise DataError(f"{where}:{line_number}: not valid JSON ({getattr(e, 'msg', e)})")
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f'{where}:{line_number}: the JSONL record has no "text" string field')
                yield record["text"].encode("utf-8", "prepare.raw"), len(line)
    except (OSError, EOFError, zlib.error) as e:  # unreadable file, broken connection, corrupt .gz
        raise DataError(f"{where}: cannot read ({getattr(e, 'strerror', None) or e})")


def _shakespeare_passages(url):
    """tiny-shakespeare is one file; its blank-line separated passages (speeches) become documents,
    so that a document-level train/val split exists. Joined with blank lines they give the file back."""
    try:
        with _download(url, "tiny-shakespeare") as response:
            data = response.read()
    except DataError as e:
        raise DataError(f"{e}; without internet, use the offline default corpus (`python prepare.py`, "
                        f"i.e. pystdlib) or a local text file")
    except OSError as e:
        raise DataError(f"cannot download tiny-shakespeare: {e}; offline, use `python prepare.py` or a local file")
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"tiny-shakespeare from {url} has SHA-256 {digest[:16]}..., expected "
                        f"{SHAKESPEARE_SHA256[:16]}...; the download is corrupt or changed, try again")
    passages = data.split(b"\n\n")
    for i, passage in enumerate(passages):
        yield passage, len(passage) + (2 if i < len(passages) - 1 else 0)


def _is_plain_file(kind, where):
    """A local file that is one document as it is (not JSONL, not compressed)."""
    return kind == "file" and not where.lower().endswith((".jsonl", ".gz"))


def iter_documents(entries, progress):
    """All documents of all sources in order, as (document, size) pairs; progress["bytes_in"] counts the input.
    A plain local file travels as its path and is read by the worker that tokenizes it: reading and passing
    file contents in this process would make it a serial bottleneck. Every other document is raw bytes."""
    for kind, where in entries:
        if _is_plain_file(kind, where):
            try:
                size = os.path.getsize(where)
            except OSError as e:
                raise DataError(f"{where}: cannot read ({e.strerror or e})")
            progress["bytes_in"] += size
            yield where, size
            continue
        documents = _shakespeare_passages(where) if kind == "shakespeare" else _read_documents(kind, where)
        for data, n_input in documents:
            progress["bytes_in"] += n_input
            yield data, len(data)


def _chunks(documents, chunk_bytes):
    """Groups (document, size) pairs into lists of documents of about chunk_bytes: one worker task each."""
    chunk, total = [], 0
    for document, size in documents:
        chunk.append(document)
        total += size
        if total >= chunk_bytes:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


# -----------------------------------------------------------------------------
# tokenizing, in worker processes (or in this process when workers == 1)

_tokenizer, _val_threshold = None, None  # set once per worker by _init_worker


def _init_worker(tokenizer, val_fraction):
    global _tokenizer, _val_threshold
    _tokenizer = get_tokenizer(tokenizer)
    _val_threshold = int(val_fraction * 2 ** 64)


def _init_pool_worker(tokenizer, val_fraction):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    _init_worker(tokenizer, val_fraction)


def _encode(text, data):
    """One document's tokens as uint16."""
    if _tokenizer.name == "byte":
        return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)
    if hasattr(_tokenizer, "encode_numpy"):
        ids = _tokenizer.encode_numpy(text)
    else:
        ids = np.array(_tokenizer.encode(text), dtype=np.int64)
    top = int(ids.max()) if ids.size else 0
    if top >= 1 << 16:
        raise DataError(f"the {_tokenizer.name} tokenizer produced token id {top}, which does not fit the uint16 "
                        f"shards (ids must be below 65536); use a tokenizer with a smaller vocabulary")
    if top >= _tokenizer.vocab_size:
        raise DataError(f"the {_tokenizer.name} tokenizer produced token id {top}, beyond its vocab_size "
                        f"{_tokenizer.vocab_size}")
    return ids.astype(TOKEN_DTYPE)


def encode_chunk(documents):
    """Tokenizes a list of documents: raw bytes, or the path of a plain file to read here. Returns each
    split's token stream (EOT before every document) and counts. The split of a document depends only
    on its content, so any chunking gives the same output."""
    global _replaced_bytes
    streams = {"train": [], "val": []}
    counts = {"train": 0, "val": 0, "empty": 0, "replaced_bytes": 0, "replaced_documents": 0}
    eot = np.array([_tokenizer.eot_token], dtype=TOKEN_DTYPE)
    for data in documents:
        if isinstance(data, str):
            [(data, _)] = _read_documents("file", data)  # a plain file is one document
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # rare: take the slow path that replaces and counts
            _replaced_bytes = 0
            text = data.decode("utf-8", "prepare.count")
            data = text.encode("utf-8")
            counts["replaced_bytes"] += _replaced_bytes
            counts["replaced_documents"] += 1
        if not data:
            counts["empty"] += 1
            continue
        content_hash = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        split = "val" if content_hash < _val_threshold else "train"
        streams[split] += [eot, _encode(text, data)]
        counts[split] += 1
    tokens = {split: np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE) for split, parts in streams.items()}
    return tokens, counts


def _map_ordered(fn, items, workers, initargs):
    """fn over items, results in order. Unlike Pool.imap (which reads its whole input ahead), at most
    TASKS_PER_WORKER tasks per worker are in flight, so memory stays bounded whatever the corpus size.
    ProcessPoolExecutor rather than multiprocessing.Pool: Pool's worker-handler thread spins while results
    wait in its pipe, and with results this large that burned ~0.2 s of CPU a run that the workers needed."""
    if workers == 1:
        _init_worker(*initargs)
        for item in items:
            yield fn(item)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_pool_worker, initargs=initargs)
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= TASKS_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError("a tokenizer worker process died (out of memory, or killed); try fewer --workers") from None
    finally:  # on an error or Ctrl-C, drop the queued tasks; those running take one chunk's time to end
        pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# writing


def _fsync_dir(path):
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the renames inside `path` durable
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ShardWriter:
    """Streams one split's tokens to disk, shard_tokens per shard. A shard is written as NAME.bin.tmp
    with a zero header (which no reader accepts), then gets its real header, fsync, and its final name."""

    def __init__(self, folder, prefix, split, shard_tokens, first_index, next_index):
        self.folder, self.prefix, self.split, self.shard_tokens = folder, prefix, split, shard_tokens
        self.index, self.next_index = first_index, next_index  # shard numbers are global across splits, as in llm.c
        self.file, self.name, self.count = None, None, 0  # the shard being written, and its tokens so far
        self.shards, self.tokens = [], 0  # finished shards

    def write(self, tokens):
        while len(tokens):
            if self.file is None:
                if self.shards:
                    self.index = next(self.next_index)
                self.name = f"{self.prefix}_{self.split}_{self.index:06d}.bin"
                self.file = open(os.path.join(self.folder, self.name + ".tmp"), "wb")
                self.file.write(bytes(HEADER_BYTES))
            part = tokens[:self.shard_tokens - self.count]
            self.file.write(memoryview(part))
            self.count += len(part)
            tokens = tokens[len(part):]
            if self.count == self.shard_tokens:
                self.close()

    def close(self):
        if self.file is None:
            return
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = SHARD_MAGIC, SHARD_VERSION, self.count
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(os.path.join(self.folder, self.name + ".tmp"), os.path.join(self.folder, self.name))
        self.shards.append(self.name)
        self.tokens += self.count
        self.file, self.count = None, 0

    def abandon(self):
        if self.file is not None:
            self.file.close()


def _write_json(path, obj):
    """Atomic: temp file, fsync, rename."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_stale_temporaries(data_dir):
    """Temporary folders of runs that were killed (their process is gone) are deleted."""
    for folder in glob.glob(os.path.join(glob.escape(data_dir), ".*.tmp-*")):
        pid = folder.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # alive, owned by someone else


class _Progress:
    """Progress lines on stderr: at most one a second on a terminal (redrawn), one every 10 s otherwise."""

    def __init__(self, total_bytes, quiet):
        self.total, self.quiet, self.tty = total_bytes, quiet, sys.stderr.isatty()
        self.start = self.last = time.time()
        self.counts = {"bytes_in": 0}

    def update(self, documents, tokens, final=False):
        now = time.time()
        if self.quiet or (not final and now - self.last < (1 if self.tty else 10)):
            return
        if final:  # the summary follows; only end a line that was being redrawn
            if self.tty and self.last > self.start:
                print(file=sys.stderr)
            return
        self.last = now
        done = self.counts["bytes_in"]
        rate = done / 1e6 / max(now - self.start, 1e-9)
        line = f"prepare: {documents:,} docs | {done / 1e6:,.1f} MB | {tokens / 1e6:,.2f}M tokens | {rate:,.1f} MB/s"
        if self.total:
            line += f" | ETA {max(self.total - done, 0) / 1e6 / max(rate, 1e-9):,.0f} s"
        print(("\r" + line + "\x1b[K") if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)


def prepare(sources, name=None, tokenizer="gpt2", data_dir=DATA_DIR, val_fraction=VAL_FRACTION,
            shard_tokens=SHARD_TOKENS, workers=None, overwrite=False, quiet=False):
    """Tokenizes `sources` into data_dir/name (shards + meta.json) and returns that path. Raises DataError
    with a one-line message on bad input; then nothing is written and any existing dataset is untouched."""
    sources = [os.fspath(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources or [])]
    sources = sources or ["pystdlib"]
    name = name or dataset_name(sources, tokenizer)
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise DataError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (no '/', not starting with '.')")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} must be between 0 and 1 (exclusive): both splits need documents")
    if not 0 < shard_tokens < 2 ** 31:
        raise DataError(f"shard_tokens {shard_tokens} must be between 1 and {2 ** 31 - 1} (an int32 header field)")
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if workers < 1:
        raise DataError(f"workers {workers} must be at least 1")
    path = os.path.join(data_dir, name)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    if os.path.exists(path) and not overwrite:
        raise DataError(f"{path} already exists; pass --overwrite to replace it, or choose another --name")
    tok = get_tokenizer(tokenizer)  # fails early, e.g. when tiktoken cannot fetch its files
    if tok.vocab_size > 1 << 16:
        raise DataError(f"the {tokenizer} tokenizer has {tok.vocab_size} ids, too many for uint16 shards")
    entries, described, total_bytes = resolve_sources(sources)

    tmp = os.path.join(data_dir, f".{name}.tmp-{os.getpid()}")
    try:
        os.makedirs(data_dir, exist_ok=True)
        _remove_stale_temporaries(data_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as e:
        raise DataError(f"cannot create {tmp}: {e.strerror or e}; check --data-dir")
    next_index = itertools.count(2)  # llm.c numbering: the first val shard is 000000, the first train 000001
    writers = {"val": ShardWriter(tmp, name, "val", shard_tokens, 0, next_index),
               "train": ShardWriter(tmp, name, "train", shard_tokens, 1, next_index)}
    progress = _Progress(total_bytes, quiet)
    totals = collections.Counter()
    results = _map_ordered(encode_chunk, _chunks(iter_documents(entries, progress.counts), CHUNK_BYTES),
                           workers, (tokenizer, val_fraction))
    try:
        with contextlib.closing(results):  # closing stops the worker pool on any error
            for tokens, counts in results:
                for split in ("val", "train"):
                    writers[split].write(tokens[split])
                totals.update(counts)
                totals["tokens"] += sum(len(t) for t in tokens.values())
                progress.update(totals["train"] + totals["val"], totals["tokens"])
        for writer in writers.values():
            writer.close()
        documents = totals["train"] + totals["val"]
        if documents == 0:
            raise DataError(f"empty corpus: {' '.join(sources)} holds no text ({totals['empty']} empty documents)")
        for split, other in (("val", "train"), ("train", "val")):
            if totals[split] == 0:
                raise DataError(f"the {split} split is empty: all {documents} document(s) went to {other} (each file "
                                f"or JSONL record is one document); add documents or change --val-fraction")
        meta = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "tokenizer": tokenizer,
            "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token,
            "shard_format": {"header": f"{HEADER_INTS} x int32: magic {SHARD_MAGIC}, version {SHARD_VERSION}, "
                                       f"n_tokens", "dtype": "uint16", "eot": "before every document"},
            "shard_tokens": shard_tokens,
            "val_fraction": val_fraction,
            "split_rule": "val if blake2b-64 of the document's UTF-8 bytes (little-endian) < val_fraction * 2**64",
            "splits": {split: {"shards": writers[split].shards, "tokens": writers[split].tokens,
                               "documents": totals[split]} for split in ("train", "val")},
            "sources": described,
            "documents": documents,
            "empty_documents_skipped": totals["empty"],
            "invalid_utf8_bytes_replaced": totals["replaced_bytes"],
            "documents_with_invalid_utf8": totals["replaced_documents"],
        }
        _write_json(os.path.join(tmp, "meta.json"), meta)
        _fsync_dir(tmp)
        _move_into_place(tmp, path, overwrite)
    except BaseException as e:  # errors and Ctrl-C alike: nothing half-written stays behind
        for writer in writers.values():
            writer.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # reading errors are DataErrors already: this is a write that failed
            raise DataError(f"cannot write {path}: {e.strerror or e} (no dataset was written)") from e
        raise
    progress.update(documents, totals["tokens"], final=True)
    if not quiet:
        _print_summary(path, meta, time.time() - progress.start, progress.counts["bytes_in"])
    return path


def _move_into_place(tmp, path, overwrite):
    """The complete dataset replaces `path`; an old dataset is removed only once the new one is in place."""
    data_dir = os.path.dirname(path) or "."
    if os.path.exists(path):
        if not overwrite:  # appeared while we were tokenizing
            raise DataError(f"{path} already exists; pass --overwrite to replace it, or choose another --name")
        old = os.path.join(data_dir, f".{os.path.basename(path)}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(data_dir)
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(data_dir)


def _print_summary(path, meta, seconds, bytes_in):
    splits = meta["splits"]
    print(f"prepare.py: wrote {path} ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']})")
    for split in ("train", "val"):
        s = splits[split]
        print(f"  {split:5s} {s['tokens']:>13,} tokens  {s['documents']:>9,} documents  {len(s['shards'])} shard(s)")
    print(f"  {bytes_in / 1e6:,.1f} MB of input in {seconds:.1f} s ({bytes_in / 1e6 / max(seconds, 1e-9):,.1f} MB/s)")
    for source in meta["sources"]:
        if source["source"] == "pystdlib":
            print(f"  pystdlib: {source['files']} files of Python {source['python']} ({source['path']})")
    notes = []
    if meta["empty_documents_skipped"]:
        notes.append(f"{meta['empty_documents_skipped']:,} empty documents skipped")
    if meta["invalid_utf8_bytes_replaced"]:
        notes.append(f"{meta['invalid_utf8_bytes_replaced']:,} invalid UTF-8 bytes replaced by U+FFFD in "
                     f"{meta['documents_with_invalid_utf8']:,} documents")
    if notes:
        print("  " + "; ".join(notes))


# -----------------------------------------------------------------------------
# command line


def _pin_malloc_threshold():
    """glibc serves big buffers with mmap until one is freed, then raises its threshold and serves them from
    the heap instead, which fragments and grows with the corpus (here: 48 MiB peak for 10 MB of text, 103 MiB
    for 200 MB). Pinning the threshold at its default keeps the command's memory flat. glibc only."""
    try:
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Tokenize text into llm.c-format shards: DIR/NAME/NAME_{val,train}_NNNNNN.bin + meta.json.",
        epilog="SOURCE: pystdlib (default, offline), shakespeare (download), a file, folder or glob "
               "(.jsonl records' \"text\" fields; .gz read transparently), or an http(s) URL.")
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="what to tokenize (default: pystdlib)")
    parser.add_argument("--name", help="dataset name (default: the source's name, plus _byte for --tokenizer byte)")
    parser.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "byte"], help="default: gpt2")
    parser.add_argument("--data-dir", default=DATA_DIR, help=f"where datasets live (default: {DATA_DIR})")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                        help=f"share of documents for validation (default: {VAL_FRACTION})")
    parser.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS,
                        help=f"tokens per shard (default: {SHARD_TOKENS:_})")
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset once the new one is done")
    parser.add_argument("--quiet", action="store_true", help="no progress or summary")
    parser.error = lambda message: sys.exit(f"prepare.py: {message} (see python prepare.py --help)")
    args = parser.parse_args(argv)
    _pin_malloc_threshold()
    try:
        prepare(args.sources, name=args.name, tokenizer=args.tokenizer, data_dir=args.data_dir,
                val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers,
                overwrite=args.overwrite, quiet=args.quiet)
    except DataError as e:
        sys.exit(f"prepare.py: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare.py: interrupted; nothing was written")


if __name__ == "__main__":
    main()
