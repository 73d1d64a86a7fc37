"""Corpus input for training (moekit.data): one-file corpora split by document, non-UTF-8 files
skipped with a message, one-line errors for bad input, check_corpus, and `moekit train` on one jsonl."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moekit.data import DocumentSlice, cached_shards, check_corpus, corpus_files, read_documents, split_files

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def rows(n=255):
    return [f"row {i:03d}: def f_{i}(x):\n    return x * {i}  # héllo" for i in range(n)]


# --------------------------------------------------------------------------- split by document


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3, 0.5])
def test_one_jsonl_splits_by_document(tmp_path, fraction):
    texts = rows()
    files = corpus_files(jsonl(tmp_path / "one.jsonl", texts))
    messages = []
    tr, va = split_files(files, fraction, log=messages.append)  # used to raise "need at least 2 files"
    train_docs, val_docs = list(read_documents(tr)), list(read_documents(va))
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(texts)
    assert train_docs == [t for t in texts if t in set(train_docs)]  # file order kept
    assert abs(len(val_docs) - 255 * fraction) <= 0.5 + 1e-9
    assert split_files(files, fraction, log=messages.append) == (tr, va)  # deterministic
    assert messages[0] == f"corpus: {str(files[0])!r} split by document: {255 - len(val_docs)} train / " \
                          f"{len(val_docs)} validation documents"


def test_split_independent_of_hash_seed(tmp_path):
    f = jsonl(tmp_path / "one.jsonl", rows())
    code = ("import sys; from moekit.data import split_files, read_documents\n"
            "tr, va = split_files([sys.argv[1]], 0.05, log=lambda m: None)\n"
            "print([d[:7] for d in read_documents(va)])")
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # another seed than this process's
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": seed}).stdout
    _, va = split_files([f], 0.05, log=lambda m: None)
    assert out == str([d[:7] for d in read_documents(va)]) + "\n"


def test_txt_paragraphs_hand_worked(tmp_path):
    paras = [f"paragraph {i}\nsecond line of {i}" for i in range(10)]
    seps = ["\n\n", "\n\n\n", "\n  \n", "\r\n\r\n"]
    text = "\n" + "".join(p + seps[i % 4] for i, p in enumerate(paras))
    f = tmp_path / "book.txt"
    f.write_bytes(text.encode())
    tr, va = split_files([f], 0.3, log=lambda m: None)
    # n = 10, v = round(3.0) = 3: document g validates iff (g+1)*3 // 10 > g*3 // 10, i.e. g = 3, 6, 9
    assert list(read_documents(va)) == [paras[3], paras[6], paras[9]]
    assert list(read_documents(tr)) == [p for i, p in enumerate(paras) if i not in (3, 6, 9)]
    # the trainer's cache key, tokenizer and log line take these lists as they took file lists
    assert len(tr) == len(va) == 1 and isinstance(va[0], DocumentSlice)


def test_txt_single_paragraph_split_by_lines(tmp_path):
    lines = [f"line {i}\n" for i in range(150)]
    f = tmp_path / "lines.txt"
    f.write_text("".join(lines))
    tr, va = split_files([f], 0.05, log=lambda m: None)
    docs = list(read_documents(tr)) + list(read_documents(va))
    # chunks of 64 lines: 64 + 64 + 22; round(3 * 0.05) = 0 -> one validation chunk, the last
    assert [d.count("\n") for d in docs] == [64, 64, 22] and "".join(docs) == "".join(lines)
    f.write_text("one\ntwo\nthree\n")
    tr, va = split_files([f], 0.05, log=lambda m: None)
    assert list(read_documents(tr)) == ["one\ntwo\n"] and list(read_documents(va)) == ["three\n"]


def test_few_files_split_by_document_across_files(tmp_path):
    texts = rows(60)
    files = [jsonl(tmp_path / f"part{i}.jsonl", texts[20 * i: 20 * i + 20]) for i in range(3)]
    tr, va = split_files(corpus_files(tmp_path), 0.05, log=lambda m: None)  # 3 files < k = 20
    val_docs = list(read_documents(va))
    assert val_docs == [texts[19], texts[39], texts[59]]  # n = 60, v = 3: g = 19, 39, 59
    assert list(read_documents(tr)) == [t for t in texts if t not in val_docs]
    assert [s.path for s in va] == files
    # enough files: by file, as before
    many = [jsonl(tmp_path / f"m{i:02d}.jsonl", texts[i: i + 1]) for i in range(20)]
    tr, va = split_files(many, 0.05)
    assert va == [many[19]] and tr == many[:19]


def test_too_few_documents(tmp_path):
    f = jsonl(tmp_path / "one.jsonl", ["only one"])
    with pytest.raises(ValueError, match=r"one.jsonl.*1 document\(s\), need at least 2"):
        split_files([f], 0.05)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="0 document"):
        split_files([tmp_path / "empty.txt"], 0.05)


def test_cache_key_includes_split(tmp_path):
    from moekit.data import train_tokenizer

    f = jsonl(tmp_path / "one.jsonl", rows(100))
    tok = train_tokenizer(rows(100), vocab_size=300, progress=False)
    cache = tmp_path / "cache"
    a = split_files([f], 0.05, log=lambda m: None)
    b = split_files([f], 0.2, log=lambda m: None)
    tr_a, va_a = cached_shards(*a, tok, cache, progress=False)
    tr_b, va_b = cached_shards(*b, tok, cache, progress=False)
    assert tr_a.parent != tr_b.parent
    assert cached_shards(*split_files([f], 0.05, log=lambda m: None), tok, cache, progress=False) == (tr_a, va_a)
    expect = [i for d in read_documents(b[1]) for i in tok.encode(d).ids + [0]]
    assert np.fromfile(va_b, dtype=np.uint16).tolist() == expect
    val_docs = list(read_documents(b[1]))
    assert len(val_docs) == 20 and val_docs[-1] == rows(100)[-1]  # round(100 * 0.2), the last one included


# --------------------------------------------------------------------------- non-UTF-8 files


def mixed_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("plain text\n")
    (d / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00")
    (d / "sub" / "latin.md").write_bytes("café crème\n".encode("latin-1"))
    (d / "sub" / "ok.md").write_text("ünïcode ok\n", encoding="utf-8")
    return d


def test_non_utf8_files_are_skipped_and_named(tmp_path, capsys):
    d = mixed_dir(tmp_path)
    messages = []
    files = corpus_files(d, log=messages.append)
    assert files == [d / "a.txt", d / "sub" / "ok.md"]  # used to include both, read with U+FFFD
    assert messages == ["corpus: skipped 2 files that are not UTF-8 text: blob.txt, sub/latin.md"]
    assert "\ufffd" not in "".join(read_documents(files))
    corpus_files(d)  # default log: stderr
    assert "skipped 2 files that are not UTF-8 text: blob.txt, sub/latin.md" in capsys.readouterr().err


def test_nothing_usable_left(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.txt").write_bytes(b"\xff\xfe\x00\x00")
    with pytest.raises(ValueError, match="empty corpus: all 1 file that is not UTF-8 text: x.txt"):
        corpus_files(d)
    with pytest.raises(ValueError, match="x.txt.*not UTF-8 text.*NUL byte at offset 2"):
        corpus_files(d / "x.txt")
    with pytest.raises(ValueError, match="empty corpus"):
        check_corpus(d)


# --------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("line,match", [
    ("{not json", r"bad.jsonl:3: invalid JSON"),
    ('{"txt": "x"}', r'bad.jsonl:3: a jsonl corpus line needs a "text" field'),
    ('{"text": 5}', r'bad.jsonl:3: "text" must be a string'),
    ('["text"]', r'bad.jsonl:3: a jsonl corpus line needs a "text" field'),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n\n' + line + '\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=match):
        split_files([f], 0.05)  # found while counting documents, before any tokenizer work
    with pytest.raises(ValueError, match=match):
        list(read_documents([f]))


def test_jsonl_with_bom(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')
    assert list(read_documents([f])) == ["a", "b"]


def test_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    if not HAS_PYARROW:
        p.write_bytes(b"PAR1")
        for call in (lambda: check_corpus(p), lambda: split_files([p], 0.05), lambda: list(read_documents([p]))):
            with pytest.raises(ValueError, match="d.parquet.*needs pyarrow: pip install pyarrow"):
                call()
        pytest.skip("pyarrow not installed (checked the error messages instead)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = rows(40)
    pq.write_table(pa.table({"text": texts}), p)
    tr, va = split_files([p], 0.05, log=lambda m: None)
    assert list(read_documents(va)) == [texts[19], texts[39]]  # n = 40, v = 2
    pq.write_table(pa.table({"text": [1, 2]}), p)
    with pytest.raises(ValueError, match="must hold strings"):
        split_files([p], 0.05)
    p.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        split_files([p], 0.05)


def test_check_corpus(tmp_path):
    check_corpus(None)
    with pytest.raises(ValueError, match="does not exist"):
        check_corpus(tmp_path / "nope")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.*is empty"):
        check_corpus(tmp_path / "empty.txt")
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl.*not UTF-8 text \(invalid UTF-8 byte 0xff at offset 10\)"):
        check_corpus(tmp_path / "x.jsonl")
    d = tmp_path / "d"
    d.mkdir()
    (d / "only.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="empty corpus"):
        check_corpus(d)
    # cheap: only the first 64 KiB of a file are looked at (corpus_files reads it all)
    big = d / "big.txt"
    big.write_bytes(b"x" * (1 << 17) + b"\xff")
    check_corpus(big)
    check_corpus(d)
    with pytest.raises(ValueError, match="not UTF-8 text.*offset 131072"):
        corpus_files(big)


# --------------------------------------------------------------------------- end to end


def moekit_cmd(*args):
    return [sys.executable, "-m", "moekit.cli", *args]


def test_train_on_one_jsonl(tmp_path):
    texts = [f"def f_{i}(x):\n    return x * {i} + {i % 7}  # doc {i}\n" * 3 for i in range(255)]
    f = jsonl(tmp_path / "one.jsonl", texts)
    out = tmp_path / "run"
    proc = subprocess.run(moekit_cmd("train", "--corpus", str(f), "--preset", "tiny", "--max-steps", "2",
                                     "--batch-size", "2", "--seq-len", "32", "--vocab-size", "300",
                                     "--eval-every", "1", "--ckpt-every", "2", "--out", str(out),
                                     "--cache-dir", str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "242 train / 13 validation documents" in proc.stdout + proc.stderr


def test_train_bad_corpus_is_one_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{oops\n')
    proc = subprocess.run(moekit_cmd("train", "--corpus", str(f), "--preset", "tiny", "--max-steps", "1",
                                     "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "bad.jsonl:3: invalid JSON" in proc.stderr


def test_read_documents_rejects_non_utf8_jsonl(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="x.jsonl.*not UTF-8 text"):
        list(read_documents([f]))
