"""`moekit train` as a user runs it (a subprocess of the real command): checks before any work, model
settings from a config file and flags, resume from the run's own settings, schedule changes on resume,
time budgets, and runs that survive accidents (issue 12)."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moekit.train import TrainConfig, lr_factor
from moekit.train.cli import build_parser
from moekit.train.peak import measured_peak
from moekit.train.schedule import fit_steps, new_decay_anchor

MOEKIT = str(Path(sys.executable).parent / "moekit")


def moekit(*args, timeout=300):
    return subprocess.run([MOEKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def common(corpus, cache):
    return ["--preset", "tiny", "--corpus", corpus, "--cache-dir", cache, "--seq-len", "32", "--batch-size", "4",
            "--vocab-size", "300", "--val-fraction", "0.1", "--warmup-steps", "2", "--eval-batches", "2",
            "--log-every", "2"]


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A finished 6-step run (checkpoints at 4 and 6) of one .jsonl file."""
    root = tmp_path_factory.mktemp("base")
    run = root / "run"
    done = moekit("train", *common(corpus, root / "cache"), "--max-steps", 6, "--eval-every", 3, "--ckpt-every", 4,
                  "--out", run)
    assert done.returncode == 0, done.stderr
    return run, root / "cache"


def copy_run(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    return run


def one_line_error(done, *words):
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()  # argparse's errors come after a one-line usage
    assert "Traceback" not in done.stderr and len(lines) == 1 + lines[0].startswith("usage:"), done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


# ------------------------------------------------------------------ before any work
@pytest.mark.parametrize("flags, words", [
    (["--preset", "smal"], ["invalid choice: 'smal'"]),
    (["--lr", "-0.1"], ["lr must be a positive number"]),
    (["--num-experts", "3", "--top-k", "4"], ["top_k=4 exceeds num_experts=3"]),
    (["--router", "hash", "--hash-vocab-size", "300", "--export-hf", "EXPORT"], ["--export-hf", "hash"]),
    (["--time-budget", "soon"], ["time_budget 'soon'"]),
    (["--device", "cuda:7"], ["cuda"]),
])
def test_bad_settings_are_refused_before_any_work_and_leave_nothing(tmp_path, corpus, flags, words):
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    run = tmp_path / "run"
    flags = [str(tmp_path / f) if f == "EXPORT" else f for f in flags]
    done = moekit("train", "--corpus", corpus, "--cache-dir", tmp_path / "cache", "--out", run, *flags)
    one_line_error(done, *words)
    assert "tokenizer" not in done.stdout and not run.exists() and not (tmp_path / "cache").exists()


def test_misspelled_flag_is_not_prefix_matched(tmp_path, corpus):
    done = moekit("train", "--corpus", corpus, "--out", tmp_path / "run", "--max-step", "3")
    assert done.returncode == 2 and "unrecognized arguments: --max-step" in done.stderr


def test_every_train_flag_is_documented_with_its_choices():
    p = build_parser()
    for action in p._actions:
        assert action.help, action.option_strings
    help_text = p.format_help()
    for word in ("muon", "adamw", "cosine", "wsd", "sigmoid_topk", "tiny", "resume_from_checkpoint"):
        assert word in help_text


# ------------------------------------------------------------------ model settings
def test_model_table_and_flags_define_the_model(tmp_path, corpus):
    conf = tmp_path / "my.toml"
    conf.write_text(f'[train]\ncorpus = "{corpus}"\nmax_steps = 2\n\n[model]\nn_layers = 3\nd_model = 48\n'
                    f'n_heads = 4\n\n[model.moe]\nnum_experts = 6\ntop_k = 3\n')
    run = tmp_path / "run"
    done = moekit("train", "--config", conf, *common(corpus, tmp_path / "cache"), "--out", run, "--top-k", "2",
                  "--d-expert", "16", "--eval-every", 2)
    assert done.returncode == 0, done.stderr
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["n_layers"], model["d_model"], model["head_dim"]) == (3, 48, 12)
    assert (model["moe"]["num_experts"], model["moe"]["top_k"], model["moe"]["d_expert"]) == (6, 2, 16)
    from moekit import load_model

    loaded = load_model(run)
    assert len(loaded.layers) == 3 and loaded.layers[0].ffn.experts.w13.shape == (6, 32, 48)
    conf.write_text('[train]\nmax_steps = 2\n\n[model]\nn_layer = 3\n')
    one_line_error(moekit("train", "--config", conf, "--out", tmp_path / "r2"), "unknown model settings", "n_layer")
    conf.write_text('[train]\nmax_steps = 2\n\n[optim]\nlr = 3\n')
    one_line_error(moekit("train", "--config", conf, "--out", tmp_path / "r3"), "optim")


# ------------------------------------------------------------------ resume
def test_kill_then_resume_with_only_out(corpus, tmp_path):
    cache = tmp_path / "cache"
    straight_run = tmp_path / "straight"
    assert moekit("train", *common(corpus, cache), "--max-steps", 8, "--eval-every", 4, "--ckpt-every", 4,
                  "--out", straight_run).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([MOEKIT, "train", *map(str, common(corpus, cache)), "--max-steps", "8", "--eval-every",
                             "4", "--ckpt-every", "4", "--out", str(run)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill at step 6: after the step-4 checkpoint, before the step-8 one
        if line.startswith("step 6/8"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # torn by the kill
    done = moekit("train", "--out", run, "--resume")
    assert done.returncode == 0, done.stderr
    assert "torn last line" in done.stdout and "resumed from" in done.stdout
    losses = [(m["step"], m["loss"]) for m in metrics(run) if "loss" in m]
    assert losses == [(m["step"], m["loss"]) for m in metrics(straight_run) if "loss" in m]  # each step once
    assert [m["step"] for m in metrics(run) if m.get("event") == "resume"] == [4]


@pytest.mark.slow  # (45 s of subprocesses: the slow tier keeps the fast one under 15 minutes)
def test_resume_refuses_silent_changes(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    done = moekit("train", "--out", run, "--resume")  # a finished run: nothing to do
    assert done.returncode == 0 and "the run is complete (step 6 of 6)" in done.stdout, done.stderr
    one_line_error(moekit("train", "--out", run, "--resume", "--max-steps", 10), "--new-decay", "from 0.100")
    one_line_error(moekit("train", "--out", run, "--resume", "--max-steps", 8, "--new-decay", "--lr", "0.01"),
                   "--allow-config-change", "lr 0.003 -> 0.01")
    one_line_error(moekit("train", "--out", run, "--resume", "--seq-len", 64), "seq_len", "start a new run")
    one_line_error(moekit("train", "--out", run, "--resume", "--n-layers", 3), "different model")
    done = moekit("train", "--out", run, "--resume", "--max-steps", 10, "--new-decay", "--lr", "0.01",
                  "--allow-config-change", "--eval-every", 2)
    assert done.returncode == 0, done.stderr
    assert "warning: resuming with changed settings: lr 0.003 -> 0.01" in done.stdout
    factors = [m["lr_factor"] for m in metrics(run) if "lr_factor" in m]  # steps 2, 4, 6 | 8, 10
    assert len(factors) == 5 and factors[3:] == [pytest.approx(0.1)] * 2  # the run had decayed to 0.1: it stays


def test_new_decay_phase_continues_the_lr_without_a_jump():
    old = TrainConfig(max_steps=400, warmup_steps=20, min_lr_ratio=0.1)
    new = TrainConfig(max_steps=800, warmup_steps=20, min_lr_ratio=0.1)
    # recomputed, step 399 of 800 would sit at 0.1 + 0.9 * (1 + cos(pi * 379 / 780)) / 2 = 0.570: a jump from 0.1
    assert lr_factor(399, new) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 379 / 780)))
    anchor = new_decay_anchor(300, old, None)
    assert lr_factor(300, new, anchor) == pytest.approx(lr_factor(300, old))
    assert lr_factor(550, new, anchor) == pytest.approx(0.1 + (anchor[1] - 0.1) * 0.5, abs=1e-3)  # half way
    assert lr_factor(799, new, anchor) == pytest.approx(0.1, abs=1e-3)
    assert new_decay_anchor(5, old, None) is None  # still warming up: the warmup ends as planned
    wsd_old = TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    wsd_new = TrainConfig(max_steps=200, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    a = new_decay_anchor(50, wsd_old, None)
    assert lr_factor(150, wsd_new, a) == 1.0 and lr_factor(180, wsd_new, a) == pytest.approx(0.5)


def test_fit_steps_by_hand():
    cfg = TrainConfig(max_steps=1000, eval_every=50, eval_batches=6, ckpt_every=100)
    # a step takes 1 s, an evaluation 6/3 = 2 s: per step 1 + 2/50 + 1/100 = 1.05 s;
    # 100 s budget, 10 s gone, 10 steps done: (100 - 10 - 2 - 1) / 1.05 = 82.8 -> 10 + 82 = 92
    assert fit_steps(100, 10, 10, 1.0, cfg) == 92
    assert fit_steps(1e6, 10, 10, 1.0, cfg) == 1000


def test_measuring_the_peak_draws_no_random_numbers():
    before = torch.get_rng_state()
    assert measured_peak(torch.device("cpu"), bf16=False, size=128, repeats=2) > 0
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.slow  # (14 s: two timed runs)
def test_time_budget_fits_the_schedule_and_stops_in_time(corpus, tmp_path):
    run = tmp_path / "run"
    start = time.perf_counter()
    done = moekit("train", *common(corpus, tmp_path / "cache"), "--max-steps", 100000, "--time-budget", "12s",
                  "--eval-every", 20, "--ckpt-every", 50, "--out", run)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert "time budget 12s:" in done.stdout
    fitted = json.loads((run / "config.json").read_text())["train"]["max_steps"]
    assert 3 < fitted < 100000
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] <= fitted and elapsed < 12 + 30  # the budget counts from the start of the run


# ------------------------------------------------------------------ accidents
@pytest.mark.slow  # (19 s of subprocesses: the slow tier keeps the fast one under 15 minutes)
def test_never_overwrite_weights_without_overwrite(base_run, tmp_path, corpus):
    run = copy_run(base_run, tmp_path)
    (run / "checkpoint" / "trainer_state.pt").unlink()
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    flags = [*common(corpus, base_run[1]), "--max-steps", 2, "--eval-every", 2, "--out", run]
    one_line_error(moekit("train", "--out", run, "--resume"), "no complete checkpoint", "trainer_state.pt")
    one_line_error(moekit("train", *flags), "already holds a training run", "--overwrite")
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before
    done = moekit("train", *flags, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert [m["step"] for m in metrics(run) if "loss" in m] == [2]


def test_a_rerun_after_a_crash_before_the_first_checkpoint_logs_each_step_once(tmp_path, corpus):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 9.0}\n{"step": 4, "loss": 8.0}\n')
    (run / ".checkpoint.new.tmp-x1y2").mkdir()  # an interrupted checkpoint write
    done = moekit("train", *common(corpus, tmp_path / "cache"), "--max-steps", 4, "--eval-every", 4, "--out", run)
    assert done.returncode == 0, done.stderr
    steps = [m["step"] for m in metrics(run) if "loss" in m]
    assert steps == [2, 4] and 9.0 not in [m["loss"] for m in metrics(run) if "loss" in m]
    assert not (run / ".checkpoint.new.tmp-x1y2").exists()


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, corpus):
    run = tmp_path / "run"
    proc = subprocess.Popen([MOEKIT, "train", *map(str, common(corpus, tmp_path / "cache")), "--max-steps", "100000",
                             "--eval-every", "1000", "--out", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        done = moekit("train", "--out", run, "--resume")
        one_line_error(done, "in use by another moekit train", f"pid {proc.pid}")
    finally:
        proc.kill()
        proc.wait()


def test_flipped_bytes_in_the_trainer_state_are_caught(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    state = run / "checkpoint" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    one_line_error(moekit("train", "--out", run, "--resume", "--max-steps", 8, "--new-decay"),
                   "checksum mismatch", "trainer_state.pt")
    sums = json.loads((run / "checkpoint" / "checksums.json").read_text())  # an older run without checksums
    del sums["trainer_state.pt"]
    (run / "checkpoint" / "checksums.json").write_text(json.dumps(sums))
    state.write_bytes(b"not a torch file")
    one_line_error(moekit("train", "--out", run, "--resume", "--max-steps", 8, "--new-decay"),
                   "trainer_state.pt", "corrupt")
