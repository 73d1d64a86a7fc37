"""Run directories that survive accidents (rundir.py): torn metrics, one writer at a time, leftovers of
interrupted writes, checksums, and loading a run caught mid-swap."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import ModelConfig, Transformer, load_model, save_model
from moekit import checkpoint as checkpoint_mod
from moekit.rundir import (CHECKSUMS_FILE, CKPT, CKPT_NEW, CKPT_OLD, STATE_FILE, RunLock, clean_stale,
                           has_weights, latest_checkpoint, read_metrics, reset_metrics, truncate_metrics,
                           verify_checksums, write_checksums)

LINES = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.5}, {"step": 2, "val_loss": 4.9},
         {"step": 3, "loss": 4.1}, {"step": 4, "loss": 3.8}]


def write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_run(tmp_path, name="run"):
    """A run directory as the trainer leaves it: checkpoint/ = moekit checkpoint + trainer_state.pt."""
    torch.manual_seed(7)
    model = Transformer(ModelConfig.preset("tiny"))
    run = tmp_path / name
    save_model(model, run / CKPT)
    torch.save({"step": 3}, run / CKPT / STATE_FILE)
    write_checksums(run / CKPT, [STATE_FILE])
    (run / "config.json").write_text(json.dumps({"train": {}, "model": model.cfg.to_dict()}))
    return model, run


# ---------------------------------------------------------------------------- metrics.jsonl
def test_torn_last_metrics_line_is_dropped_with_a_note(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, LINES, tail='{"step": 5, "loss": 3.')
    notes = []
    assert read_metrics(path, log=notes.append) == LINES
    assert len(notes) == 1 and str(path) in notes[0] and "line 6" in notes[0]


def test_corrupt_middle_metrics_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n" + '{"step": 2, "lo\n' + json.dumps(LINES[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl' line 2 is not valid JSON"):
        read_metrics(path, log=lambda m: None)


def test_truncate_keeps_lines_up_to_step_and_reset_removes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, LINES, tail='{"step": 5, "lo')
    assert truncate_metrics(path, 2, log=lambda m: None) == 3
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in LINES if r["step"] <= 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left
    reset_metrics(path)
    assert not path.exists()
    reset_metrics(path)  # nothing to reset: fine


# ---------------------------------------------------------------------------- one writer at a time
HOLDER = "import sys, time\nfrom moekit.rundir import RunLock\nwith RunLock(sys.argv[1]):\n" \
         "    print('locked', flush=True)\n    time.sleep(120)\n"
CONTENDER = "import sys\nfrom moekit.rundir import RunLock\ntry:\n    with RunLock(sys.argv[1]):\n" \
            "        print('acquired')\nexcept ValueError as err:\n    print(err)\n    sys.exit(3)\n"


def test_second_writer_is_refused_and_lock_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = subprocess.run([sys.executable, "-c", CONTENDER, str(run)], capture_output=True, text=True)
        assert other.returncode == 3
        assert other.stdout.strip() == (f"run directory {str(run)!r} is in use by another moekit train "
                                        f"(pid {holder.pid}); wait for it or choose another --out")
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            RunLock(run).__enter__()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with RunLock(run):  # the OS released the killed holder's lock: nothing stale
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
            RunLock(run).__enter__()
    with RunLock(run):  # released on exit
        pass


# ---------------------------------------------------------------------------- leftovers
def test_clean_stale_removes_interrupted_writes(tmp_path):
    _, run = make_run(tmp_path)
    for name in (".checkpoint.new.tmp-a1b2c3", ".checkpoint.old-123-a1b2c3", CKPT_NEW):
        (run / name).mkdir()
        (run / name / "model.safetensors").write_bytes(b"partial")
    logged = []
    removed = clean_stale(run, log=logged.append)
    assert sorted(removed) == [".checkpoint.new.tmp-a1b2c3", ".checkpoint.old-123-a1b2c3", CKPT_NEW]
    assert sorted(p.name for p in run.iterdir()) == [CKPT, "config.json"]
    assert len(logged) == 1 and CKPT_NEW in logged[0]
    assert clean_stale(run, log=logged.append) == [] and len(logged) == 1


def test_checkpoint_new_alone_is_kept_and_counts_as_weights(tmp_path):
    _, run = make_run(tmp_path)
    assert has_weights(run)
    os.rename(run / CKPT, run / CKPT_NEW)  # crashed before the first swap: the only weights there are
    assert clean_stale(run, log=print) == [] and (run / CKPT_NEW).is_dir()
    assert has_weights(run) and latest_checkpoint(run) is None
    assert not has_weights(tmp_path)


def test_save_model_error_leaves_no_temp_dir_and_the_old_checkpoint(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.preset("tiny"))
    save_model(model, tmp_path / "ckpt")
    before = sha256(tmp_path / "ckpt" / "model.safetensors")

    class BrokenTokenizer:
        def save(self, path):
            raise OSError("disk full")

    model.tokenizer = BrokenTokenizer()
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "ckpt")
    model.tokenizer = None
    real_rename, calls = os.rename, []

    def rename_failing_second(src, dst):  # the rename of the temp dir into place fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint_mod.os, "rename", rename_failing_second)
    with pytest.raises(OSError, match="rename failed"):
        save_model(model, tmp_path / "ckpt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sha256(tmp_path / "ckpt" / "model.safetensors") == before


# ---------------------------------------------------------------------------- checksums
def test_checksums_cover_every_file_and_merge(tmp_path):
    _, run = make_run(tmp_path)
    ckpt = run / CKPT
    table = json.loads((ckpt / CHECKSUMS_FILE).read_text())
    assert table == {name: sha256(ckpt / name) for name in ("model.safetensors", "moekit_config.json", STATE_FILE)}
    assert verify_checksums(ckpt) == 3 and latest_checkpoint(run) == ckpt
    data = bytearray((ckpt / STATE_FILE).read_bytes())
    data[-10] ^= 0xFF
    (ckpt / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checksum mismatch in '.*trainer_state.pt': the file is corrupt"):
        latest_checkpoint(run)


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:  # truncated, in a checkpoint of an older moekit (no checksums.json): safetensors must say it
        path.write_bytes(bytes(data[: len(data) // 2]))
        (path.parent / CHECKSUMS_FILE).unlink()


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_weights_error_names_the_file(tmp_path, how):
    _, run = make_run(tmp_path)
    weights = run / CKPT / "model.safetensors"
    expected = sha256(weights)
    corrupt(weights, how)
    if how == "flip":
        message = f"checksum mismatch in {str(weights)!r}: the file is corrupt (expected {expected}, found {sha256(weights)})"
    else:
        message = f"{str(weights)!r} is not a readable safetensors file"
    for target in (run, run / CKPT):
        with pytest.raises(ValueError) as err:
            load_model(target)
        assert str(err.value).startswith(message)
    cmd = [sys.executable, "-m", "moekit.cli", "generate", "--checkpoint", str(run / CKPT),
           "--prompt-ids", "1,2", "--max-new-tokens", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("moekit generate: error: ") and message in result.stderr


# ---------------------------------------------------------------------------- mid-swap
def test_run_caught_mid_swap_loads_the_surviving_checkpoint(tmp_path):
    model, run = make_run(tmp_path)
    os.rename(run / CKPT, run / CKPT_OLD)  # crashed after moving checkpoint/ aside
    assert latest_checkpoint(run) == run / CKPT_OLD
    reference = model.state_dict()

    def same_weights(loaded):
        state = loaded.state_dict()
        return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)

    assert same_weights(load_model(run))
    (run / CKPT).mkdir()  # checkpoint/ begun but lacking its files: checkpoint.old/ is still the one
    (run / CKPT / "model.safetensors").write_bytes(b"")
    assert latest_checkpoint(run) == run / CKPT_OLD and same_weights(load_model(run))


def test_run_without_a_loadable_checkpoint_says_why(tmp_path):
    _, run = make_run(tmp_path)
    os.remove(run / CKPT / "moekit_config.json")
    with pytest.raises(ValueError, match=r"has no complete checkpoint \(checkpoint/ is missing moekit_config.json\)"):
        load_model(run)
    assert latest_checkpoint(run) is None
    fresh = tmp_path / "fresh"  # crashed before its first checkpoint: config.json is a training config
    fresh.mkdir()
    (fresh / "config.json").write_text(json.dumps({"train": {}, "model": {}}))
    with pytest.raises(ValueError, match=r"'.*fresh' has no complete checkpoint \(training stopped before"):
        load_model(fresh)
