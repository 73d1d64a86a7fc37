"""A training run directory that survives accidents: which checkpoint is complete, checksums, one writer
at a time, leftovers of interrupted writes, and a metrics.jsonl that tolerates a torn last line.

    config.json        the training configuration
    metrics.jsonl      one JSON object per line, each with "step"
    tokenizer.json
    checkpoint/        the latest complete checkpoint (a moekit checkpoint plus trainer_state.pt)
    checkpoint.new/    being written; swapped in with renames
    checkpoint.old/    the previous one, only mid-swap: then it is the complete one
    .lock              flock'ed by the training process that writes the directory (holds its pid)

Every checkpoint directory holds checksums.json ({file: sha256 hex}); a file that does not match is an
error, never silently used. Standard library only: checkpoint.py builds on this module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

CKPT, CKPT_NEW, CKPT_OLD = "checkpoint", "checkpoint.new", "checkpoint.old"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
CONFIG_FILE = "moekit_config.json"  # the files of a moekit checkpoint (checkpoint.py writes them)
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "checksums.json"

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]


# ---------------------------------------------------------------------------- checksums
def sha256_file(path: PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(ckpt_dir: PathLike) -> Dict[str, str]:
    """{file: sha256} of ckpt_dir/checksums.json; {} when there is none (checkpoints of older moekit)."""
    file = Path(ckpt_dir) / CHECKSUMS_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON (the checkpoint is corrupt): {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{str(file)!r} is not a {{file: sha256}} table (the checkpoint is corrupt)")
    return data


def write_checksums(ckpt_dir: PathLike, names: Iterable[str]) -> Path:
    """Add the sha256 of each named file in ckpt_dir to its checksums.json (entries already there stay),
    written atomically (a temp file, then os.replace)."""
    ckpt_dir = Path(ckpt_dir)
    table = read_checksums(ckpt_dir)
    table.update({name: sha256_file(ckpt_dir / name) for name in names})
    file = ckpt_dir / CHECKSUMS_FILE
    tmp = ckpt_dir / f".{CHECKSUMS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)
    return file


def verify_checksums(ckpt_dir: PathLike) -> int:
    """Check every file listed in ckpt_dir/checksums.json; returns how many. ValueError naming the file
    on a mismatch or a listed file that is missing. No checksums.json: nothing to verify (returns 0)."""
    ckpt_dir = Path(ckpt_dir)
    table = read_checksums(ckpt_dir)
    for name, expected in table.items():
        file = ckpt_dir / name
        if not file.is_file():
            raise ValueError(f"{str(file)!r} is missing (listed in {CHECKSUMS_FILE}): the checkpoint is incomplete")
        found = sha256_file(file)
        if found != expected:
            raise ValueError(f"checksum mismatch in {str(file)!r}: the file is corrupt "
                             f"(expected {expected}, found {found})")
    return len(table)


# ---------------------------------------------------------------------------- which checkpoint
def missing_files(ckpt_dir: PathLike, need: Iterable[str]) -> List[str]:
    """The files of `need` and of checksums.json that ckpt_dir lacks."""
    ckpt_dir = Path(ckpt_dir)
    names = dict.fromkeys([*need, *read_checksums(ckpt_dir)])
    return [name for name in names if not (ckpt_dir / name).is_file()]


def find_checkpoint(run_dir: PathLike, need: Tuple[str, ...], verify: bool = True) -> Tuple[Optional[Path], List[str]]:
    """(checkpoint/ or, mid-swap, checkpoint.old/: the first holding every file of `need` and of its
    checksums.json; None if neither does, why each is incomplete). `verify`: check its checksums."""
    problems = []
    for name in (CKPT, CKPT_OLD):
        path = Path(run_dir) / name
        if not path.is_dir():
            continue
        missing = missing_files(path, need)
        if missing:
            problems.append(f"{name}/ is missing {', '.join(missing)}")
            continue
        if verify:
            verify_checksums(path)
        return path, problems
    return None, problems


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint to resume from: checkpoint/, or checkpoint.old/ when a crash interrupted the swap;
    None when neither is complete. A complete one whose checksums do not match raises ValueError."""
    return find_checkpoint(run_dir, (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE))[0]


def model_checkpoint(run_dir: PathLike) -> Path:
    """The checkpoint of a run directory to load weights from (trainer_state.pt not needed, checksums
    not verified here: load_moekit does), or ValueError saying why there is none."""
    path, problems = find_checkpoint(run_dir, (CONFIG_FILE, WEIGHTS_FILE), verify=False)
    if path is not None:
        return path
    if (Path(run_dir) / CKPT_NEW).is_dir():
        problems.append(f"{CKPT_NEW}/ is an unfinished write")
    detail = "; ".join(problems) or "training stopped before its first checkpoint"
    raise ValueError(f"run directory {str(run_dir)!r} has no complete checkpoint ({detail})")


def is_run_dir(path: PathLike) -> bool:
    """Whether `path` looks like a moekit training run: a checkpoint dir, metrics.jsonl, or a config.json
    with a "train" table (an HF config.json never has one)."""
    path = Path(path)
    if any((path / name).is_dir() for name in (CKPT, CKPT_OLD, CKPT_NEW)) or (path / METRICS_FILE).is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "train" in config


def has_weights(run_dir: PathLike) -> bool:
    """Whether any checkpoint dir of the run (complete or not) holds model weights."""
    return any((Path(run_dir) / name / WEIGHTS_FILE).is_file() for name in (CKPT, CKPT_OLD, CKPT_NEW))


def clean_stale(run_dir: PathLike, log: Log = print) -> List[str]:
    """Remove what interrupted writes left behind: save_model's temp dirs (.checkpoint*.tmp-*,
    .checkpoint*.old-*), a metrics temp file, and checkpoint.new/ when checkpoint/ or checkpoint.old/
    exists (a write that never got swapped in). Returns the names removed. Call it holding the RunLock."""
    run_dir = Path(run_dir)
    stale = [*run_dir.glob(".checkpoint*.tmp-*"), *run_dir.glob(".checkpoint*.old-*"),
             *run_dir.glob(f".{METRICS_FILE}.tmp-*")]
    if (run_dir / CKPT_NEW).exists() and ((run_dir / CKPT).is_dir() or (run_dir / CKPT_OLD).is_dir()):
        stale.append(run_dir / CKPT_NEW)
    removed = []
    for path in sorted(stale):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    if removed:
        log(f"removed leftovers of an interrupted write in {str(run_dir)!r}: {', '.join(removed)}")
    return removed


# ---------------------------------------------------------------------------- one writer at a time
class RunLock:
    """`with RunLock(run_dir):` an exclusive flock on run_dir/.lock holding this pid. A second writer gets
    ValueError at once; the OS drops the lock when the holder exits or is killed, so it never goes stale."""

    def __init__(self, run_dir: PathLike):
        self.run_dir = Path(run_dir)
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"run directory {str(self.run_dir)!r} is in use by another moekit train "
                             f"(pid {holder}); wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------- metrics.jsonl
def metric_lines(path: PathLike, log: Log = print) -> List[Tuple[str, dict]]:
    """(line text, parsed object) of each non-blank line. A torn last line (a write cut short) is dropped
    with a note; any other line that is not a JSON object is a ValueError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise ValueError(f"metrics file {str(path)!r} does not exist") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    out = []
    for k, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(numbered) - 1:
                log(f"note: dropped the torn last line {number} of {str(path)!r} (a write cut short)")
                break
            raise ValueError(f"{str(path)!r} line {number} is not valid JSON: {err}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{str(path)!r} line {number} is not a JSON object")
        out.append((line, record))
    return out


def read_metrics(path: PathLike, log: Log = print) -> List[dict]:
    """The records of a metrics.jsonl (see `metric_lines`)."""
    return [record for _, record in metric_lines(path, log)]


def truncate_metrics(path: PathLike, step: int, log: Log = print) -> int:
    """Keep the lines with step <= `step` (those after a checkpoint will be written again on resume),
    dropping a torn last line; rewritten atomically. Returns the number of lines kept (0: no file)."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = metric_lines(path, log)
    keep = [line for line, record in lines if record.get("step", 0) <= step]
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    if len(keep) < len(lines):
        log(f"{path.name}: dropped {len(lines) - len(keep)} lines after step {step} (they will be written again)")
    return len(keep)


def reset_metrics(path: PathLike) -> None:
    """Remove the metrics of a run that never reached a checkpoint, so a fresh start does not append to them."""
    Path(path).unlink(missing_ok=True)
