"""Tokenizer training/loading, memory-mapped token shards and training batches (README.md, "Training").
Which files and documents a corpus holds, and the validation split: corpus.py.

A token shard is a flat raw array of token ids (`uint16` when the vocabulary has at
most 65535 entries, else `uint32`), every document followed by the `EOT` token, with a
JSON sidecar `<shard>.json` {"dtype", "num_tokens", "vocab_size", "eot_id"}. Both are
written to a temp file and renamed (atomic). `tokenizers` and `tqdm` are
imported only by the functions that need them.

Shape legend: B batch, T sequence length (seq_len), N tokens in a shard, W windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import pathlib
import sys
import tempfile
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .corpus import (CORPUS_SUFFIXES, DocumentSlice, check_corpus, corpus_files, default_corpus_files,
                     read_documents, split_files)

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

__all__ = ["EOT", "CORPUS_SUFFIXES", "default_corpus_files", "check_corpus", "corpus_files", "DocumentSlice",
           "read_documents", "split_files",
           "train_tokenizer", "load_tokenizer", "tokenize_to_shard", "write_token_file", "read_shard_meta",
           "cached_shards", "TokenWindows"]

EOT = "<|endoftext|>"
MIN_VOCAB_SIZE = 300  # 256 bytes + EOT + a few merges
_CACHE_FORMAT = "moekit-shards-v1"
_ENCODE_BATCH_DOCS = 256

PathLike = Union[str, os.PathLike]


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

    Data parallelism: with `num_shards` ranks, each batch is a global batch of batch_size x num_shards
    windows and rank `shard` gets rows [shard*B, (shard+1)*B) of it. The position (epoch, pos) counts
    global windows, so a run resumed at another world size with the same global batch sees the same windows.
    """

    def __init__(self, path: PathLike, seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 shard: int = 0, num_shards: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len}, batch_size={batch_size}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, num_shards={num_shards})")
        self.path = pathlib.Path(path)
        meta = read_shard_meta(self.path)
        self.dtype = np.dtype(meta["dtype"])
        self.num_tokens = int(meta["num_tokens"])
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shard, self.num_shards = int(shard), int(num_shards)
        self.num_windows = max(self.num_tokens - 1, 0) // self.seq_len
        if self.num_windows < self.batch_size * self.num_shards:
            ranks = f" x {self.num_shards} data-parallel ranks" if self.num_shards > 1 else ""
            raise ValueError(
                f"batch larger than data: {str(self.path)!r} has {self.num_tokens} tokens = "
                f"{self.num_windows} windows of seq_len={self.seq_len}, fewer than batch_size={self.batch_size}{ranks}"
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
        """This rank's rows of the next global batch."""
        picked = []
        need = self.batch_size * self.num_shards
        while need:
            take = self._order(self.epoch)[self.pos : self.pos + need]
            picked.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.num_windows:
                self.epoch += 1
                self.pos = 0
        B = self.batch_size
        return self._gather(np.concatenate(picked)[self.shard * B : (self.shard + 1) * B])

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
        leaves the training position alone. With num_shards > 1: this rank's rows of the full global
        batches only (every rank gets batch_size rows)."""
        B, G = self.batch_size, self.batch_size * self.num_shards
        n_batches = -(-self.num_windows // G) if self.num_shards == 1 else self.num_windows // G
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            lo = b * G + self.shard * B
            hi = min(lo + B, self.num_windows)
            yield self._gather(np.arange(lo, hi))
