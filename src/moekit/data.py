"""Corpora, tokenizer training/loading, and memory-mapped token shards (README.md, "Training").

A token shard is a flat raw array of token ids (`uint16` when the vocabulary has at
most 65535 entries, else `uint32`), every document followed by the `EOT` token, with a
JSON sidecar `<shard>.json` {"dtype", "num_tokens", "vocab_size", "eot_id"}. Both are
written to a temp file and renamed (atomic). `tokenizers`, `pyarrow` and `tqdm` are
imported only by the functions that need them.

Shape legend: B batch, T sequence length (seq_len), N tokens in a shard, W windows.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import itertools
import json
import os
import pathlib
import re
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

__all__ = ["EOT", "CORPUS_SUFFIXES", "default_corpus_files", "check_corpus", "corpus_files", "DocumentSlice",
           "read_documents", "split_files",
           "train_tokenizer", "load_tokenizer", "tokenize_to_shard", "write_token_file", "read_shard_meta",
           "cached_shards", "TokenWindows"]

EOT = "<|endoftext|>"
CORPUS_SUFFIXES = (".txt", ".py", ".md", ".rst", ".jsonl", ".parquet")
MIN_VOCAB_SIZE = 300  # 256 bytes + EOT + a few merges
_CACHE_FORMAT = "moekit-shards-v1"
_ENCODE_BATCH_DOCS = 256
_SNIFF_BYTES = 1 << 16  # check_corpus reads this much of a file; corpus_files reads files in chunks of it
_LINES_PER_CHUNK = 64  # a one-paragraph text file split by document: chunks of this many lines
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- corpus files


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_corpus_files() -> list[pathlib.Path]:
    """The running interpreter's standard-library `*.py` files, sorted by relative path, without
    site-packages and test directories, so the result is the same on every run of one interpreter."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"standard library directory {str(root)!r} does not exist; pass a corpus path")
    found = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*.py")
        if not _STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    )
    if not found:
        raise ValueError(f"empty corpus: no *.py files under the standard library {str(root)!r}")
    return [p for _, p in found]


def _not_text_reason(path: pathlib.Path, limit: Optional[int] = None) -> Optional[str]:
    """Why the file (its first `limit` bytes, else all of it) is not UTF-8 text, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(_SNIFF_BYTES if limit is None else min(_SNIFF_BYTES, limit - offset)):
            if (nul := chunk.find(b"\0")) >= 0:
                return f"NUL byte at offset {offset + nul}"
            try:
                decoder.decode(chunk, final=False)
            except UnicodeDecodeError as e:
                return f"invalid UTF-8 byte 0x{chunk[e.start]:02x} at offset {offset + e.start}"
            offset += len(chunk)
            if limit is not None and offset >= limit:
                return None  # a character cut at the limit is fine
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "truncated UTF-8 character at the end"
    return None


def _require_pyarrow_parquet(path: pathlib.Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading the parquet corpus file {str(path)!r} needs pyarrow: pip install pyarrow") from None
    return pq


def _candidates(root: pathlib.Path) -> Iterator[pathlib.Path]:
    return (q for q in root.rglob("*") if q.suffix.lower() in CORPUS_SUFFIXES and q.is_file())


def check_corpus(path: Optional[PathLike]) -> None:
    """Cheap up-front check of a corpus argument (None = the standard library): raises ValueError
    for a missing path, an empty or non-UTF-8 file (first 64 KiB sniffed), a parquet file without
    pyarrow, or a directory without one usable file. Reads at most a few files' first bytes."""
    if path is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise ValueError(f"standard library directory {str(root)!r} does not exist; pass a corpus path")
        return
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"corpus path {str(path)!r} does not exist")
    if p.is_file():
        if p.stat().st_size == 0:
            raise ValueError(f"corpus file {str(path)!r} is empty")
        if p.suffix.lower() == ".parquet":
            _require_pyarrow_parquet(p)
        elif reason := _not_text_reason(p, limit=_SNIFF_BYTES):
            raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text ({reason})")
        return
    if not p.is_dir():
        raise ValueError(f"corpus path {str(path)!r} is neither a file nor a directory")
    for q in _candidates(p):
        if q.suffix.lower() == ".parquet":
            _require_pyarrow_parquet(q)
            return
        if q.stat().st_size and not _not_text_reason(q, limit=_SNIFF_BYTES):
            return
    raise ValueError(f"empty corpus: no non-empty UTF-8 files with suffixes {', '.join(CORPUS_SUFFIXES)} "
                     f"under {str(path)!r}")


def corpus_files(path: Optional[PathLike], log: Optional[Callable[[str], None]] = None) -> list[pathlib.Path]:
    """Resolve a corpus argument into a sorted list of UTF-8 text (or parquet) files.

    None -> `default_corpus_files()`; a file -> `[file]` (any text file, `.jsonl` with a
    "text" field, `.parquet` with a "text" column); a directory -> every file under it
    (recursively) whose suffix is in `CORPUS_SUFFIXES`, sorted by relative path. Files that
    are not UTF-8 text (a NUL byte or a strict-decoding error) are left out and reported in
    one line through `log` (default: stderr); ValueError when nothing usable is left.
    """
    if path is None:
        root, files = None, default_corpus_files()
    else:
        root = pathlib.Path(path).expanduser()
        if not root.exists():
            raise ValueError(f"corpus path {str(path)!r} does not exist")
        if root.is_file():
            if root.suffix.lower() != ".parquet" and (reason := _not_text_reason(root)):
                raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text ({reason})")
            return [root]
        if not root.is_dir():
            raise ValueError(f"corpus path {str(path)!r} is neither a file nor a directory")
        files = [q for _, q in sorted((q.relative_to(root).as_posix(), q) for q in _candidates(root))]
        if not files:
            raise ValueError(f"empty corpus: no files with suffixes {', '.join(CORPUS_SUFFIXES)} under {str(path)!r}")
    kept, skipped = [], []
    for f in files:
        if f.suffix.lower() == ".parquet" or not _not_text_reason(f):
            kept.append(f)
        else:
            skipped.append(f.relative_to(root).as_posix() if root else str(f))
    if skipped:
        what = f"{len(skipped)} file{'s' if len(skipped) > 1 else ''} that {'are' if len(skipped) > 1 else 'is'}"
        message = f"{what} not UTF-8 text: {', '.join(skipped)}"
        if not kept:
            raise ValueError(f"empty corpus: all {message} (under {str(path)!r})")
        (log or _stderr_log)(f"corpus: skipped {message}")
    return kept


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class DocumentSlice:
    """One side (train or validation) of one file in a split by document.

    Documents are numbered across the whole corpus (`first` = this file's first one); with
    n = `num_docs` and v = `num_val`, document g is validation iff (g+1)*v // n > g*v // n:
    v evenly spaced documents, the last one included, whatever the Python hash seed.
    """

    path: pathlib.Path
    first: int
    num_docs: int
    num_val: int
    val: bool

    def is_val(self, g: int) -> bool:
        return (g + 1) * self.num_val // self.num_docs > g * self.num_val // self.num_docs

    def count(self, num_in_file: int) -> int:
        """How many of the file's `num_in_file` documents this slice holds."""
        lo, hi = self.first, self.first + num_in_file
        n_val = hi * self.num_val // self.num_docs - lo * self.num_val // self.num_docs
        return n_val if self.val else num_in_file - n_val


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text (invalid byte at offset {e.start})") from None


def _text_blocks(text: str) -> list[str]:
    """A text file's documents in a split by document: paragraphs (separated by blank lines);
    a file of one paragraph is cut into chunks of up to `_LINES_PER_CHUNK` lines (at least two
    chunks when it has two lines)."""
    blocks = [b.strip("\r\n") for b in re.split(r"\n\s*\n", text) if b.strip()]
    if len(blocks) != 1:
        return blocks
    lines = text.splitlines(keepends=True)
    size = max(1, min(_LINES_PER_CHUNK, -(-len(lines) // 2)))
    return ["".join(lines[i : i + size]) for i in range(0, len(lines), size)]


def _read_jsonl(path: pathlib.Path) -> Iterator[str]:
    with open(path, "r", encoding="utf-8-sig") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or "text" not in obj:
                    raise ValueError(f'{path}:{lineno}: a jsonl corpus line needs a "text" field')
                text = obj["text"]
                if not isinstance(text, str):
                    raise ValueError(f'{path}:{lineno}: "text" must be a string, got {type(text).__name__}')
                yield text
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text ({e.reason})") from None


def _parquet_file(path: pathlib.Path):
    """A pyarrow ParquetFile with a string "text" column."""
    pq = _require_pyarrow_parquet(path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise ValueError(f'{path}: a parquet corpus needs a "text" column; it has {schema.names}')
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f'{path}: the parquet "text" column must hold strings, it holds {kind}')
    return pf


def _read_parquet(path: pathlib.Path) -> Iterator[str]:
    for batch in _parquet_file(path).iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield "" if text is None else text


def _file_documents(path: pathlib.Path, by_block: bool) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif by_block:
        yield from _text_blocks(_read_text(path))
    else:
        yield _read_text(path)


def _count_documents(path: pathlib.Path) -> int:
    if path.suffix.lower() == ".parquet":
        return _parquet_file(path).metadata.num_rows
    return sum(1 for _ in _file_documents(path, by_block=True))


def read_documents(files: Iterable[Union[PathLike, DocumentSlice]]) -> Iterator[str]:
    """Yield documents: one per text file (strict UTF-8), one per jsonl line's "text", one per
    parquet row's "text"; a `DocumentSlice` yields its side of its file's documents (a text
    file's documents are then its paragraphs, see `split_files`)."""
    for f in files:
        if isinstance(f, DocumentSlice):
            for i, doc in enumerate(_file_documents(f.path, by_block=True)):
                if f.is_val(f.first + i) == f.val:
                    yield doc
        else:
            yield from _file_documents(pathlib.Path(f), by_block=False)


def split_files(files: Sequence[PathLike], val_fraction: float = 0.05,
                log: Optional[Callable[[str], None]] = None) -> tuple[list, list]:
    """Deterministic train/validation split.

    By file when there are at least k = max(2, round(1/val_fraction)) files: files k-1, 2k-1, ...
    validate (paths returned as given). With fewer files (one .txt/.jsonl/.parquet, say), by
    document: round(val_fraction * n) of the n documents (at least one each side) validate, as
    lists of `DocumentSlice`; a text file's documents are its paragraphs (blank-line separated)
    or, for a single paragraph, chunks of lines. This case is reported through `log` (default: stderr).
    """
    files = list(files)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not files:
        raise ValueError("cannot split an empty corpus into train and validation")
    k = max(2, round(1.0 / val_fraction))
    if len(files) >= k:
        return [f for i, f in enumerate(files) if (i + 1) % k], [f for i, f in enumerate(files) if not (i + 1) % k]
    paths = [pathlib.Path(f) for f in files]
    counts = [_count_documents(p) for p in paths]
    n = sum(counts)
    where = f"{str(paths[0])!r}" if len(paths) == 1 else f"{len(paths)} files"
    if n < 2:
        raise ValueError(f"cannot split {where} into train and validation: it has {n} document(s), need at least 2")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    train, val, first = [], [], 0
    for p, c in zip(paths, counts):
        for side, out in ((False, train), (True, val)):
            part = DocumentSlice(p, first, n, n_val, side)
            if part.count(c):
                out.append(part)
        first += c
    (log or _stderr_log)(f"corpus: {where} split by document: {n - n_val} train / {n_val} validation documents")
    return train, val


# --------------------------------------------------------------------------- tokenizer


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ValueError("tokenizer support needs the `tokenizers` package: pip install tokenizers") from None
    return tokenizers


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, *, progress: bool = True
) -> "tokenizers.Tokenizer":
    """Train a byte-level BPE tokenizer (GPT-2 style) with `EOT` as token id 0.

    Every byte is in the alphabet, so any string round-trips exactly through
    `tok.decode(tok.encode(s).ids)`.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab too small: vocab_size={vocab_size}, need at least {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + {EOT} + merges)"
        )
    tk = _require_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    assert tok.token_to_id(EOT) == 0
    return tok


def load_tokenizer(path: PathLike) -> "tokenizers.Tokenizer":
    """Load a `tokenizers.Tokenizer` from a tokenizer.json file or a directory holding one."""
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"no tokenizer file at {str(p)!r}")
    tk = _require_tokenizers()
    return tk.Tokenizer.from_file(str(p))


# --------------------------------------------------------------------------- shards


def _dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _sidecar(path: PathLike) -> pathlib.Path:
    return pathlib.Path(str(path) + ".json")


@contextlib.contextmanager
def _atomic_file(path: pathlib.Path):
    """A binary file to write, a temp file beside `path` renamed to it on success (removed on error)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_sidecar(path: pathlib.Path, dtype: np.dtype, num_tokens: int, vocab_size: int, eot_id) -> None:
    meta = {"dtype": dtype.name, "num_tokens": int(num_tokens), "vocab_size": int(vocab_size), "eot_id": eot_id}
    with _atomic_file(_sidecar(path)) as f:
        f.write((json.dumps(meta, indent=1) + "\n").encode())


def read_shard_meta(path: PathLike) -> dict:
    """The sidecar of a token shard, checked against the shard's size."""
    path = pathlib.Path(path)
    side = _sidecar(path)
    if not side.is_file():
        raise ValueError(f"token shard {str(path)!r} has no sidecar {str(side)!r}")
    try:
        meta = json.loads(side.read_text())
        dtype = np.dtype(meta["dtype"])
        n = int(meta["num_tokens"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable token shard sidecar {str(side)!r}: {e}") from None
    if not path.is_file():
        raise ValueError(f"token shard {str(path)!r} does not exist")
    size = path.stat().st_size
    if size != n * dtype.itemsize:
        raise ValueError(
            f"token shard {str(path)!r} has {size} bytes, its sidecar says {n} tokens of {dtype.name}"
        )
    return meta


def write_token_file(tokens_N, out_path: PathLike, vocab_size: int, eot_id: Optional[int] = None) -> int:
    """Write a flat 1-D token array (+ sidecar) atomically; returns the number of tokens."""
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = _dtype_for_vocab(vocab_size)
    arr_N = np.asarray(tokens_N).reshape(-1)
    if arr_N.size and (arr_N.min() < 0 or arr_N.max() >= max(vocab_size, 1)):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{arr_N.min()}, {arr_N.max()}]")
    with _atomic_file(out_path) as f:
        f.write(arr_N.astype(dtype).tobytes())
    _write_sidecar(out_path, dtype, arr_N.size, vocab_size, eot_id)
    return int(arr_N.size)


class _Progress:
    """tqdm when importable, else a plain counter on stderr; silent when not enabled."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.docs, self.tokens, self.bar = enabled, desc, 0, 0, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(desc=desc, unit="doc", file=sys.stderr, dynamic_ncols=True)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix(tokens=self.tokens, refresh=False)
        elif self.enabled:
            print(f"\r{self.desc}: {self.docs} docs, {self.tokens} tokens", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr, flush=True)


def tokenize_to_shard(
    documents: Iterable[str], tokenizer: "tokenizers.Tokenizer", out_path: PathLike, progress: bool = True
) -> int:
    """Encode documents (EOT after each) into a flat token shard at `out_path`; returns the token count.

    Literal "<|endoftext|>" text inside a document is encoded as ordinary text, so
    the only EOT ids in the shard are the document separators.
    """
    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise ValueError(f"the tokenizer has no {EOT!r} token; train it with moekit.data.train_tokenizer")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = _dtype_for_vocab(vocab_size)
    eot_bytes = np.array([eot_id], dtype=dtype).tobytes()
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    # encode_batch_fast (tokenizers >= 0.21) skips offset tracking (only `.ids` is used here)
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    bar = _Progress(progress, f"tokenizing {out_path.name}")
    old_special = tokenizer.encode_special_tokens
    num_tokens = 0
    docs = iter(documents)
    try:
        tokenizer.encode_special_tokens = True
        with _atomic_file(out_path) as f:
            while batch := list(itertools.islice(docs, _ENCODE_BATCH_DOCS)):
                n = 0
                for enc in encode_batch(batch, add_special_tokens=False):
                    ids = np.asarray(enc.ids, dtype=dtype)
                    f.write(ids.tobytes())
                    f.write(eot_bytes)
                    n += ids.size + 1
                num_tokens += n
                bar.update(len(batch), n)
    finally:
        tokenizer.encode_special_tokens = old_special
        bar.close()
    _write_sidecar(out_path, dtype, num_tokens, vocab_size, eot_id)
    return num_tokens


def _cache_key(files_train: Sequence[PathLike], files_val: Sequence[PathLike], tokenizer) -> str:
    h = hashlib.sha256()
    h.update(_CACHE_FORMAT.encode())
    for name, files in (("train", files_train), ("val", files_val)):
        h.update(f"\0{name}\0{len(files)}\0".encode())
        for f in files:
            part = f if isinstance(f, DocumentSlice) else None
            p = part.path if part else pathlib.Path(f)
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if part:  # the split itself: another val_fraction or corpus size gives other shards
                h.update(f"docs\0{part.first}\0{part.num_docs}\0{part.num_val}\0{part.val}\0".encode())
    h.update(b"\0tokenizer\0")
    h.update(tokenizer.to_str().encode())
    return h.hexdigest()


def cached_shards(files_train: Sequence[PathLike], files_val: Sequence[PathLike], tokenizer: "tokenizers.Tokenizer",
                  cache_dir: PathLike, progress: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
    """Token shards for a train/val file split, cached under `cache_dir/<key>/{train,val}.bin`.

    The key is a sha256 over every file's (path, size, mtime_ns), the split (each
    `DocumentSlice`'s fields) and the tokenizer's JSON, so editing a file, another split or
    retraining the tokenizer builds fresh shards; a shard that fails
    `read_shard_meta` is rebuilt.
    """
    files_train, files_val = list(files_train), list(files_val)
    if not files_train or not files_val:
        raise ValueError(
            f"cached_shards needs train and validation files, got {len(files_train)} and {len(files_val)}"
        )
    out = pathlib.Path(cache_dir).expanduser() / _cache_key(files_train, files_val, tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    train_bin, val_bin = out / "train.bin", out / "val.bin"
    for files, shard in ((files_train, train_bin), (files_val, val_bin)):
        try:
            fresh = read_shard_meta(shard).get("vocab_size") == vocab_size
        except ValueError:
            fresh = False
        if not fresh:
            tokenize_to_shard(read_documents(files), tokenizer, shard, progress=progress)
    return train_bin, val_bin


# --------------------------------------------------------------------------- batches


class TokenWindows:
    """Memory-mapped (np.memmap) token file; batches of (x_BT, y_BT) int64 torch tensors, y = x shifted by one.

    Window i covers tokens[i*T : i*T + T + 1] (T = seq_len); there are (N - 1) // T windows.
    With shuffle, each epoch visits every window once in the order of
    `torch.randperm(W, generator=torch.Generator().manual_seed(seed + epoch))`; a batch
    that crosses an epoch's end continues into the next epoch's order.
    """

    def __init__(self, path: PathLike, seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len}, batch_size={batch_size}")
        self.path = pathlib.Path(path)
        meta = read_shard_meta(self.path)
        self.dtype = np.dtype(meta["dtype"])
        self.num_tokens = int(meta["num_tokens"])
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_windows = max(self.num_tokens - 1, 0) // self.seq_len
        if self.num_windows < self.batch_size:
            raise ValueError(
                f"batch larger than data: {str(self.path)!r} has {self.num_tokens} tokens = "
                f"{self.num_windows} windows of seq_len={self.seq_len}, fewer than batch_size={self.batch_size}"
            )
        self.tokens_N = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        self.epoch = 0
        self.pos = 0
        self._perm_epoch = None
        self._perm_W = None

    def __len__(self) -> int:
        return self.num_windows

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm_W = torch.randperm(self.num_windows, generator=g).numpy()
            self._perm_epoch = epoch
        return self._perm_W

    def _gather(self, windows_B: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = [self.tokens_N[i * T : i * T + T + 1] for i in windows_B]
        w_BT1 = torch.from_numpy(np.stack(rows).astype(np.int64))
        return w_BT1[:, :-1].contiguous(), w_BT1[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = []
        need = self.batch_size
        while need:
            take = self._order(self.epoch)[self.pos : self.pos + need]
            picked.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.num_windows:
                self.epoch += 1
                self.pos = 0
        return self._gather(np.concatenate(picked))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "pos", "seed"} - set(state)
        if missing:
            raise ValueError(f"TokenWindows state is missing {sorted(missing)}")
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos < self.num_windows:
            raise ValueError(
                f"TokenWindows state epoch={epoch}, pos={pos} does not fit {self.num_windows} windows"
            )
        self.epoch, self.pos, self.seed = epoch, pos, int(state["seed"])
        self._perm_epoch = None

    def iter_eval(self, max_batches: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In-order batches over every window (the last may be smaller than batch_size);
        leaves the training position alone."""
        n_batches = -(-self.num_windows // self.batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            lo = b * self.batch_size
            hi = min(lo + self.batch_size, self.num_windows)
            yield self._gather(np.arange(lo, hi))
