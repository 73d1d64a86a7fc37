"""Training: loss goes down, kill-and-resume is bit-identical, checkpoints are atomic, CLI errors are clear."""

import json
import random

import pytest
import torch

from moekit import load_model
from moekit.cli import main
from moekit.rundir import latest_checkpoint
from moekit.train import Trainer, TrainConfig, cli, lr_factor


def make_corpus(root, n_files=8, seed=0):
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "for", "in", "if", "else", "value", "print", "(", ")", ":", "x", "y"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
        (root / f"f{i:02d}.py").write_text("\n".join(lines))
    return root


def tiny_cfg(tmp_path, **kw):
    base = dict(preset="tiny", corpus=str(make_corpus(tmp_path / "corpus")), out=str(tmp_path / "run"),
                vocab_size=320, seq_len=32, batch_size=4, max_steps=12, eval_every=6, eval_batches=2,
                ckpt_every=6, log_every=3, warmup_steps=2, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    base.update(kw)
    return TrainConfig(**base)


def quiet(_msg):
    pass


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, max_steps=40, optimizer="muon"), log=quiet)
    x, y = trainer.train_data.next_batch()
    trainer.train_data.load_state_dict({"epoch": 0, "pos": 0, "seed": trainer.cfg.seed})

    def loss():
        trainer.model.eval()
        with torch.no_grad():
            out = trainer._loss(x, y)[0].item()
        trainer.model.train()
        return out

    before = loss()
    trainer.train()
    assert loss() < before - 0.5
    lines = [json.loads(l) for l in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in l for l in lines) and any("tokens_per_s" in l for l in lines)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_kill_and_resume_gives_the_same_losses(tmp_path, optimizer):
    straight = Trainer(tiny_cfg(tmp_path / "a", optimizer=optimizer), log=quiet).train()
    first = Trainer(tiny_cfg(tmp_path / "b", optimizer=optimizer), log=quiet)
    part1 = first.train(stop_after=6)
    del first  # "killed" after the step-6 checkpoint
    part2 = Trainer(tiny_cfg(tmp_path / "b", optimizer=optimizer), resume=True, log=quiet).train()
    assert len(straight) == 12 and part1 + part2 == straight  # bit-identical on CPU


@pytest.mark.parametrize("stage", ["written-model", "written-state", "moved-old"])
def test_crash_mid_save_leaves_a_loadable_checkpoint(tmp_path, stage):
    trainer = Trainer(tiny_cfg(tmp_path), log=quiet)
    trainer.train(stop_after=6)  # a good checkpoint at step 6
    ref = load_model(trainer.run_dir / "checkpoint")
    with torch.no_grad():  # the weights move on before the next save, which crashes
        for p in trainer.model.parameters():
            p.add_(0.01)
    trainer.step += 1

    def crash(at):
        if at == stage:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        trainer.save(fault=crash)
    trainer.close()  # the process "died": its lock on the run is gone
    path = latest_checkpoint(trainer.run_dir)
    assert path is not None
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    assert state["step"] == 6
    tokens = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).eval()(tokens), ref.eval()(tokens))
    # and training resumes from it
    Trainer(tiny_cfg(tmp_path), resume=True, log=quiet)


def test_lr_schedules():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=0.01)
    wsd = TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(90, wsd) == pytest.approx(0.5)


def run_cli(argv, capsys):
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def test_cli_errors_are_clear_and_leave_runs_intact(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    common = ["--preset", "tiny", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "cache"),
              "--seq-len", "32", "--batch-size", "4", "--vocab-size", "320", "--val-fraction", "0.2"]
    code, err = run_cli(["--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "r0")], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "r1")], capsys)
    assert code == 2 and "empty corpus" in err.lower()
    code, err = run_cli(common + ["--vocab-size", "100", "--out", str(tmp_path / "r2")], capsys)
    assert code == 2 and "vocab" in err.lower()
    code, err = run_cli(common + ["--batch-size", "100000", "--out", str(tmp_path / "r3")], capsys)
    assert code == 2 and "batch" in err.lower()
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(common + ["--out", str(tmp_path / "afile" / "run")], capsys)
    assert code == 2 and "run directory" in err
    # a finished run, then an incompatible resume and a clobbering fresh start are refused
    run = str(tmp_path / "run")
    assert run_cli(common + ["--out", run, "--max-steps", "3", "--eval-every", "3", "--ckpt-every", "3"], capsys)[0] == 0
    before = (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes()
    code, err = run_cli(common + ["--out", run, "--resume", "--preset", "small"], capsys)
    assert code == 2 and "different model" in err
    code, err = run_cli(common + ["--out", run], capsys)
    assert code == 2 and "--resume" in err
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes() == before
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 3 and cfg["model"]["name"] == "tiny"


def test_config_file_and_generate_and_plot_on_a_run(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    conf = tmp_path / "conf.toml"
    conf.write_text(f'[train]\npreset = "tiny"\ncorpus = "{corpus}"\nvocab_size = 320\nseq_len = 32\n'
                    f'batch_size = 4\nmax_steps = 4\neval_every = 4\nckpt_every = 4\nval_fraction = 0.2\n'
                    f'cache_dir = "{tmp_path / "cache"}"\n')
    run = tmp_path / "run"
    assert cli(["--config", str(conf), "--out", str(run), "--max-steps", "5"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 5  # flag beats file
    from moekit.generate import cli as generate_cli

    assert generate_cli(["--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    pytest.importorskip("matplotlib")
    from moekit.plot import plot_run

    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "expert_load.png"] and all(p.stat().st_size > 1000 for p in paths)


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    trainer = Trainer(tiny_cfg(tmp_path, max_steps=3, log_every=3, eval_every=3, ckpt_every=3), log=quiet)
    trainer.train()
    assert any(p.name.startswith("events.out.tfevents") for p in (trainer.run_dir / "tensorboard").iterdir())
