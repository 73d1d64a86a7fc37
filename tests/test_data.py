"""Tests for moekit.data: corpora, tokenizer, token shards, TokenWindows."""

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from moekit import data
from moekit.data import (
    EOT,
    TokenWindows,
    cached_shards,
    corpus_files,
    default_corpus_files,
    load_tokenizer,
    read_documents,
    split_files,
    tokenize_to_shard,
    train_tokenizer,
    write_token_file,
)

pytest.importorskip("tokenizers")

SAMPLES = [
    "hello world",
    "def f(x):\n    return x ** 2  # square\n",
    "  leading spaces and\ttabs\r\nand CRLF\n",
    "unicode: héllo wörld — 日本語 🙂 Ωμέγα",
    "",
    "class A:\n\tpass\n\n\n",
    "literal <|endoftext|> inside text",
    "\x00\x01 bytes \ufffd",
]


def _synthetic_docs(n=60):
    docs = []
    for i in range(n):
        docs.append(
            f"def function_{i}(arg_{i}, value=None):\n"
            f"    '''Return the value {i} times.'''\n"
            f"    for j in range({i}):\n"
            f"        print('héllo wörld', j, arg_{i})\n"
            f"    return value\n"
        )
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_synthetic_docs() + SAMPLES, vocab_size=400, progress=False)


# --------------------------------------------------------------------------- corpus


def test_default_corpus_is_stdlib_sorted_and_deterministic():
    import sysconfig

    files = default_corpus_files()
    assert len(files) > 100
    assert files == default_corpus_files()
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert "os.py" in rel
    for r in rel:
        parts = r.split("/")[:-1]
        assert "site-packages" not in parts
        assert "test" not in parts and "tests" not in parts and "idle_test" not in parts
        assert r.endswith(".py")
    assert corpus_files(None) == files


def test_corpus_files_dir_and_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.jsonl").write_text('{"text": "c"}\n')
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "b" / "y.rst").write_text("y")
    files = corpus_files(str(tmp_path))
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.txt", "b/y.rst", "b/z.md", "c.jsonl"]
    odd = tmp_path / "notes.log"
    odd.write_text("any text")
    assert corpus_files(odd) == [odd]


def test_corpus_files_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        corpus_files(str(tmp_path / "nope"))
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="empty corpus"):
        corpus_files(tmp_path)


def test_read_documents_txt_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("héllo\n\nwörld\n", encoding="utf-8")
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two ünï"}) + "\n")
    docs = list(read_documents([t, j]))
    assert docs == ["héllo\n\nwörld\n", "one", "two ünï"]  # a whole text file is one document
    t.write_bytes("héllo\n".encode() + b"\xff bad byte")  # no silent U+FFFD any more
    with pytest.raises(ValueError, match="a.txt.*not UTF-8 text"):
        list(read_documents([t]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match='"text"'):
        list(read_documents([bad]))


def test_read_documents_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="pip install pyarrow"):
            list(read_documents([p]))
        pytest.skip("pyarrow not installed (checked the error message instead)")
    pq.write_table(pa.table({"text": ["a", "bé", "c"], "n": [1, 2, 3]}), p)
    assert list(read_documents([p])) == ["a", "bé", "c"]
    assert corpus_files(tmp_path) == [p]


def test_split_files_deterministic():
    files = [f"f{i:03d}" for i in range(100)]
    tr, va = split_files(files, 0.05)
    assert va == [f"f{i:03d}" for i in range(19, 100, 20)]
    assert len(tr) == 95 and set(tr) | set(va) == set(files) and not set(tr) & set(va)
    assert split_files(files, 0.05) == (tr, va)
    assert tr == sorted(tr)
    tr, va = split_files(["a", "b"], 0.9)  # k = 2 files: still by file
    assert tr == ["a"] and va == ["b"]
    # fewer files than k = 20 are split by document (tests/test_data_corpus.py)


def test_split_files_errors(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single line")
    with pytest.raises(ValueError, match="1 document.*at least 2"):
        split_files([one])
    with pytest.raises(ValueError, match="val_fraction"):
        split_files(["a", "b"], 0.0)
    with pytest.raises(ValueError, match="empty corpus"):
        split_files([])


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip(tok, tmp_path):
    assert tok.token_to_id(EOT) == 0
    assert 300 <= tok.get_vocab_size() <= 400
    for s in SAMPLES + ["import os\nprint(os.getcwd())\n", "never seen: ʕ•ᴥ•ʔ ∀x∈ℝ"]:
        ids = tok.encode(s).ids
        if EOT in s:  # the special token is matched, and decode() skips specials by default
            assert tok.decode(ids, skip_special_tokens=False) == s
        else:
            assert tok.decode(ids) == s, s
    # merges were learned: common code compresses below one token per byte
    s = _synthetic_docs(3)[2]
    assert len(tok.encode(s).ids) < len(s.encode()) / 2
    tok.save(str(tmp_path / "tokenizer.json"))
    for p in (tmp_path, tmp_path / "tokenizer.json"):
        t2 = load_tokenizer(p)
        assert t2.encode(SAMPLES[3]).ids == tok.encode(SAMPLES[3]).ids
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_on_stdlib_files():
    files = default_corpus_files()[:10]
    t = train_tokenizer(read_documents(files), vocab_size=512, progress=False)
    text = files[0].read_text(encoding="utf-8", errors="replace")
    assert t.decode(t.encode(text).ids) == text


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab too small"):
        train_tokenizer(["abc"], vocab_size=256)


# --------------------------------------------------------------------------- shards


def test_tokenize_to_shard_contents(tok, tmp_path):
    docs = SAMPLES + _synthetic_docs(5)
    out = tmp_path / "sub" / "s.bin"
    n = tokenize_to_shard(iter(docs), tok, out, progress=False)
    expected = []
    for d in docs:
        expected += tok.encode(d).ids + [0]
    # the literal "<|endoftext|>" text is plain text in a shard, not a separator
    lit = SAMPLES.index("literal <|endoftext|> inside text")
    assert 0 in tok.encode(docs[lit]).ids
    lit_start = sum(len(tok.encode(d).ids) + 1 for d in docs[:lit])
    tok.encode_special_tokens = True
    try:
        lit_ids = tok.encode(docs[lit]).ids
    finally:
        tok.encode_special_tokens = False
    assert 0 not in lit_ids
    expected[lit_start : lit_start + len(tok.encode(docs[lit]).ids)] = lit_ids
    meta = json.loads((tmp_path / "sub" / "s.bin.json").read_text())
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == n == len(expected)
    assert meta["vocab_size"] == tok.get_vocab_size()
    got = np.fromfile(out, dtype=np.uint16)
    assert got.tolist() == expected
    assert (got == 0).sum() == len(docs)
    assert not tok.encode_special_tokens  # restored
    assert sorted(os.listdir(tmp_path / "sub")) == ["s.bin", "s.bin.json"]  # no temp files left


def test_tokenize_to_shard_progress_runs(tok, tmp_path, capsys):
    n = tokenize_to_shard(SAMPLES, tok, tmp_path / "p.bin", progress=True)
    assert n == read_and_count(tmp_path / "p.bin")


def read_and_count(path):
    return data.read_shard_meta(path)["num_tokens"]


def test_write_token_file_uint32(tmp_path):
    write_token_file(np.array([0, 70000, 5]), tmp_path / "big.bin", vocab_size=70001)
    meta = data.read_shard_meta(tmp_path / "big.bin")
    assert meta["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "big.bin", dtype=np.uint32).tolist() == [0, 70000, 5]


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, doc in enumerate(_synthetic_docs(6)):
        (d / f"f{i}.py").write_text(doc)
    return corpus_files(d)


def test_cached_shards_reuse_and_key(tok, tmp_path, monkeypatch):
    files = _corpus(tmp_path)
    tr, va = split_files(files, 0.3)
    calls = []
    real = data.tokenize_to_shard

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(data, "tokenize_to_shard", counting)
    cache = tmp_path / "cache"
    trb, vab = cached_shards(tr, va, tok, cache, progress=False)
    assert len(calls) == 2 and trb.name == "train.bin" and vab.name == "val.bin"
    assert trb.parent == vab.parent and trb.parent.parent == cache
    expect_tr = sum(len(tok.encode(d).ids) + 1 for d in read_documents(tr))
    assert data.read_shard_meta(trb)["num_tokens"] == expect_tr
    mtime = trb.stat().st_mtime_ns
    assert cached_shards(tr, va, tok, cache, progress=False) == (trb, vab)
    assert len(calls) == 2 and trb.stat().st_mtime_ns == mtime

    # a corrupt shard (size mismatch) is rebuilt
    vab.write_bytes(b"\x00")
    cached_shards(tr, va, tok, cache, progress=False)
    assert len(calls) == 3

    # another tokenizer -> another key
    tok2 = train_tokenizer(_synthetic_docs(10), vocab_size=320, progress=False)
    trb2, _ = cached_shards(tr, va, tok2, cache, progress=False)
    assert trb2.parent != trb.parent and len(calls) == 5

    # an edited file -> another key
    tr[0].write_text("changed content, longer than before " * 20)
    trb3, _ = cached_shards(tr, va, tok, cache, progress=False)
    assert trb3.parent not in (trb.parent, trb2.parent)


# --------------------------------------------------------------------------- TokenWindows


def _arange_file(tmp_path, n):
    p = tmp_path / "arange.bin"
    write_token_file(np.arange(n), p, vocab_size=max(n, 300))
    return p


def test_windows_in_order(tmp_path):
    T, B, N = 4, 3, 30  # (30 - 1) // 4 = 7 windows
    w = TokenWindows(_arange_file(tmp_path, N), seq_len=T, batch_size=B, shuffle=False)
    assert len(w) == 7
    x, y = w.next_batch()
    assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == (B, T) == y.shape
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert torch.equal(y, x + 1)
    x, _ = w.next_batch()
    assert x[:, 0].tolist() == [12, 16, 20]
    x, y = w.next_batch()  # crosses the epoch boundary: window 6, then 0, 1
    assert x[:, 0].tolist() == [24, 0, 4] and torch.equal(y, x + 1)
    assert w.state_dict() == {"epoch": 1, "pos": 2, "seed": 0}


def test_windows_shuffle_covers_each_epoch(tmp_path):
    T, B, N = 5, 4, 5 * 24 + 1  # 24 windows, 6 batches per epoch
    w = TokenWindows(_arange_file(tmp_path, N), seq_len=T, batch_size=B, seed=3)
    epochs = []
    for _ in range(2):
        starts = []
        for _ in range(6):
            x, y = w.next_batch()
            assert torch.equal(y, x + 1)
            assert torch.equal(x, x[:, :1] + torch.arange(T))
            starts += (x[:, 0] // T).tolist()
        assert sorted(starts) == list(range(24))
        epochs.append(starts)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(24))
    expect0 = torch.randperm(24, generator=torch.Generator().manual_seed(3)).tolist()
    assert epochs[0] == expect0
    w2 = TokenWindows(w.path, seq_len=T, batch_size=B, seed=3)
    assert (w2.next_batch()[0][:, 0] // T).tolist() == expect0[:4]


def test_windows_resume_exact(tmp_path):
    p = _arange_file(tmp_path, 7 * 13 + 1)  # 13 windows, B=5 does not divide it
    a = TokenWindows(p, seq_len=7, batch_size=5, seed=11)
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    assert set(state) == {"epoch", "pos", "seed"}
    state = json.loads(json.dumps(state))  # survives JSON
    expected = [a.next_batch() for _ in range(8)]
    b = TokenWindows(p, seq_len=7, batch_size=5, seed=0)
    b.load_state_dict(state)
    for xa, ya in expected:
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError):
        b.load_state_dict({"epoch": 0, "pos": 99, "seed": 0})


def test_iter_eval_order_and_position(tmp_path):
    p = _arange_file(tmp_path, 4 * 10 + 1)  # 10 windows
    w = TokenWindows(p, seq_len=4, batch_size=3, seed=1)
    w.next_batch()
    before = w.state_dict()
    batches = list(w.iter_eval())
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 1]
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [4 * i for i in range(10)]
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(w.iter_eval(max_batches=2))) == 2
    assert w.state_dict() == before


def test_batch_larger_than_data(tmp_path):
    p = _arange_file(tmp_path, 20)  # (20 - 1) // 8 = 2 windows
    with pytest.raises(ValueError, match="batch larger than data.*batch_size=3"):
        TokenWindows(p, seq_len=8, batch_size=3)
    assert len(TokenWindows(p, seq_len=8, batch_size=2)) == 2


def test_windows_on_real_shard(tok, tmp_path):
    out = tmp_path / "s.bin"
    n = tokenize_to_shard(_synthetic_docs(20), tok, out, progress=False)
    w = TokenWindows(out, seq_len=16, batch_size=4)
    assert len(w) == (n - 1) // 16
    x, y = w.next_batch()
    assert int(x.max()) < tok.get_vocab_size()
    assert torch.equal(x[:, 1:], y[:, :-1])
