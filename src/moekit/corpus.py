"""Corpora: which files, which documents, and the train/validation split (README.md, "Training").

The default corpus is the running interpreter's standard library. `--corpus` is one file or a
directory of text (.txt, .py, .md, .rst), .jsonl ({"text": ...} per line) or .parquet (a string
`text` column) files. Files that are not UTF-8 text are skipped and named. With enough files the
validation split is by file; with fewer (most often one file) by document (`DocumentSlice`).
`pyarrow` is imported only when a parquet file is read.
"""

from __future__ import annotations

import codecs
import json
import os
import pathlib
import re
import sys
import sysconfig
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

__all__ = ["CORPUS_SUFFIXES", "default_corpus_files", "check_corpus", "corpus_files", "DocumentSlice",
           "read_documents", "split_files"]

CORPUS_SUFFIXES = (".txt", ".py", ".md", ".rst", ".jsonl", ".parquet")
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
