"""`torchrun -m moekit train` on CPU with gloo (issue 13): FSDP, expert parallelism and FSDP x EP give the
per-step losses of one process with the same global batch; a run killed after a checkpoint resumes on
another number of processes; bad layouts are one clear line; generate/convert read a sharded run."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MOEKIT = str(Path(sys.executable).parent / "moekit")
GLOBAL_BATCH = 8


def torchrun(nproc, *args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "moekit", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def plain(*args):
    return subprocess.run([MOEKIT, "train", *map(str, args)], capture_output=True, text=True, timeout=600)


def losses(run, key="loss"):
    lines = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(m["step"], m[key]) for m in lines if key in m]


def assert_same_losses(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)


def assert_same_run(run, ref):
    """Per-step losses and gradient norms (AdamW and Muon hide a scaled gradient; the norm does not)."""
    for key in ("loss", "grad_norm"):
        assert_same_losses(losses(run, key), losses(ref, key))


# one training step of a parallelized model against one process on the same global batch, in one script
STEP_SCRIPT = """
import sys, torch, torch.nn.functional as F
from torch.distributed.tensor import DTensor
from moekit.config import ModelConfig
from moekit.dist.fsdp import clip_grad_norm, parallelize
from moekit.dist.mesh import Layout, build_meshes, finish_and_exit, init_distributed
from moekit.model import Transformer
from moekit.optim import build_optimizer

ep, dp_replicate = int(sys.argv[1]), int(sys.argv[2])
env = init_distributed()
layout = Layout(ep=ep, dp_replicate=dp_replicate).check(env.world_size, 8)
cfg = ModelConfig.preset("tiny", vocab_size=300, dtype="float32", moe=dict(
    d_model=64, d_expert=32, num_experts=8, top_k=2, router="sigmoid_topk", num_groups=4, topk_groups=2,
    aux_loss_coef=0.01, seq_aux_loss_coef=0.01, z_loss_coef=0.001, num_shared_experts=1))
torch.manual_seed(0)
one, par = Transformer(cfg), Transformer(cfg)
par.load_state_dict(one.state_dict())
parallelize(par, build_meshes(env, layout), layout)
tokens = torch.randint(0, 300, (8, 17), generator=torch.Generator().manual_seed(1))
B = 8 // env.world_size
rows = slice(env.rank * B, (env.rank + 1) * B)

def step(model, tokens, clip):
    opt, _ = build_optimizer(model, kind="muon", lr=1e-2, muon_lr=0.05)
    logits = model(tokens[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    (ce + model.moe_aux().loss).backward()
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
             for n, p in model.named_parameters()}
    norm = clip(model)
    opt.step()
    return grads, norm

full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
g1, n1 = step(one, tokens, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
g2, n2 = step(par, tokens[rows], lambda m: clip_grad_norm(m, 0.5))
for name, g in g1.items():
    torch.testing.assert_close(g2[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"gradient of {name}: {m}")
torch.testing.assert_close(full(n2), n1, rtol=1e-5, atol=0)
for (name, p1), p2 in zip(one.named_parameters(), par.parameters()):  # Muon, AdamW (first step ~ lr*sign(g))
    torch.testing.assert_close(full(p2.detach()), p1.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
import os
os.write(1, f"rank {env.rank} ok\\n".encode())  # one write: the ranks share the pipe (print's pieces interleaved)
finish_and_exit(0)
"""


def run_step_script(tmp_path, nproc, ep, dp_replicate=1):
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(script),
           str(ep), str(dp_replicate)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.count(" ok") == nproc, done.stdout + done.stderr[-4000:]


def test_gradients_and_a_muon_step_equal_one_process_under_fsdp_x_ep(tmp_path):
    """Every parameter's gradient (CE + Switch, sequence and z losses, sigmoid group routing, a shared expert),
    the clipped norm and the parameters after a Muon/AdamW step equal one process's on the same global batch."""
    run_step_script(tmp_path, 2, ep=2)


@pytest.mark.slow
@pytest.mark.parametrize("ep, dp_replicate", [(1, 1), (2, 1), (2, 2), (1, 2)])
def test_gradients_and_a_muon_step_on_four_processes(tmp_path, ep, dp_replicate):
    run_step_script(tmp_path, 4, ep=ep, dp_replicate=dp_replicate)


def flags(corpus, cache, nproc, optimizer="muon", steps=3, **extra):
    out = ["--preset", "tiny", "--corpus", corpus, "--cache-dir", cache, "--seq-len", 32, "--vocab-size", 300,
           "--val-fraction", 0.1, "--warmup-steps", 2, "--eval-batches", 2, "--log-every", 1,
           "--eval-every", steps, "--ckpt-every", steps, "--max-steps", steps, "--optimizer", optimizer,
           "--batch-size", GLOBAL_BATCH // nproc]
    for key, value in extra.items():
        out += [f"--{key.replace('_', '-')}", value]
    return out


class Reference(dict):
    """One process, no torch.distributed: the global batch of 8 per step; each optimizer's run made once."""

    def __init__(self, corpus, root):
        super().__init__()
        self.corpus, self.root, self.cache = corpus, root, root / "cache"

    def __missing__(self, optimizer):
        run = self.root / optimizer
        done = plain(*flags(self.corpus, self.cache, 1, optimizer), "--out", run)
        assert done.returncode == 0, done.stderr
        self[optimizer] = run
        return run


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    ref = Reference(corpus, tmp_path_factory.mktemp("ref"))
    return ref, ref.cache


@pytest.mark.slow  # (33 s, two processes: the slow tier keeps the fast one under 15 minutes)
def test_fsdp_x_ep_on_two_processes_gives_one_process_losses_and_a_loadable_run(corpus, reference, tmp_path):
    runs, cache = reference
    run = tmp_path / "run"
    done = torchrun(2, *flags(corpus, cache, 2, "muon"), "--ep", 2, "--out", run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(run, runs["muon"])
    assert "2 processes: dp_replicate 1 x dp_shard 2, ep 2" in done.stdout
    assert (run / "checkpoint" / ".metadata").is_file() and not (run / "checkpoint" / "model.safetensors").exists()
    # generate, load_model and convert read the sharded checkpoint: the weights of one process's run
    from moekit import load_model

    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(run)(tokens), load_model(runs["muon"])(tokens), rtol=1e-4, atol=1e-4)
    gen = subprocess.run([MOEKIT, "generate", run, "--prompt", "def ", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and "Warning" not in gen.stderr, gen.stderr
    conv = subprocess.run([MOEKIT, "convert", run, tmp_path / "hf"], capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), conv.stderr


@pytest.mark.parametrize("nproc, args, words", [
    (2, ["--ep", 3], "--ep 3 does not divide dp_shard 2"),
    pytest.param(2, ["--dp-shard", 3], "world size 2 is not dp_replicate 1 x dp_shard 3", marks=pytest.mark.slow),
    pytest.param(4, ["--ep", 4, "--num-experts", 6], "num_experts=6 is not divisible by --ep 4",
                 marks=pytest.mark.slow),
    (1, ["--ep", 2], "one process: launch with torchrun"),
])
def test_bad_layouts_are_one_clear_line_before_any_work(corpus, tmp_path, nproc, args, words):
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--corpus", corpus, "--cache-dir", tmp_path / "cache", "--out", run, *args]
    done = torchrun(nproc, *common) if nproc > 1 else plain(*common)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("moekit train: error:")]
    assert len(errors) == 1 and words in errors[0], done.stderr  # rank 0 reports, the others exit quietly
    assert "moekit/" not in done.stderr  # no traceback of moekit's (torchrun adds its own report)
    assert not run.exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("nproc, optimizer, layout", [
    (2, "adamw", []),
    (2, "muon", []),
    (2, "adamw", ["--ep", 2]),
    (4, "adamw", ["--ep", 2]),
    (4, "muon", ["--ep", 2]),
    (4, "muon", ["--dp-replicate", 2]),
])
def test_parallel_layouts_give_one_process_losses(corpus, reference, tmp_path, nproc, optimizer, layout):
    runs, cache = reference
    done = torchrun(nproc, *flags(corpus, cache, nproc, optimizer), *layout, "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "run", runs[optimizer])


@pytest.mark.slow
def test_kill_a_two_process_run_and_resume_on_one_and_on_four(corpus, reference, tmp_path):
    _, cache = reference
    straight = tmp_path / "straight"
    assert plain(*flags(corpus, cache, 1, "adamw", steps=6), "--ckpt-every", 3, "--out", straight).returncode == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekit",
           "train", *map(str, flags(corpus, cache, 2, "adamw", steps=6)), "--ckpt-every", "3", "--ep", "2",
           "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    for line in proc.stdout:  # after the step-3 checkpoint, before the step-6 one
        if line.startswith("step 4/6"):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run / "config.json").read_text())["train"]["ep"] == 2
    for nproc, layout in ((1, []), (4, ["--ep", 4])):
        copy = tmp_path / f"resumed{nproc}"
        shutil.copytree(run, copy)
        args = ["--out", copy, "--resume", "--batch-size", GLOBAL_BATCH // nproc, *layout]
        done = torchrun(nproc, *args) if nproc > 1 else plain(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed from" in done.stdout
        assert_same_run(copy, straight)
    # another global batch is a change the user must accept
    done = plain("--out", tmp_path / "resumed1", "--resume", "--max-steps", 8, "--new-decay", "--batch-size", 4)
    assert done.returncode == 2 and "global batch 8 x 1 x 1 = 8 -> 4 x 1 x 1 = 4" in done.stderr, done.stderr


@pytest.mark.slow
def test_a_one_process_run_resumes_on_two_processes(corpus, reference, tmp_path):
    runs, _ = reference
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(runs["adamw"], one)
    shutil.copytree(runs["adamw"], two)
    assert plain("--out", one, "--resume", "--max-steps", 5, "--new-decay").returncode == 0
    done = torchrun(2, "--out", two, "--resume", "--max-steps", 5, "--new-decay", "--batch-size", 4, "--ep", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(two, one)
    assert (two / "checkpoint" / ".metadata").is_file()


@pytest.mark.slow
def test_a_sharded_save_cut_short_leaves_the_previous_checkpoint_loadable(corpus, reference, tmp_path):
    """The state a crash leaves at each point of the sharded save (DCP shards half written into
    checkpoint.new/; the previous checkpoint moved to checkpoint.old/ but the new one not yet in place):
    the run loads, resumes from the surviving checkpoint and continues to the uninterrupted run's losses."""
    runs, cache = reference
    first = tmp_path / "first"  # steps 1..3, checkpoint at 3
    done = torchrun(2, *flags(corpus, cache, 2, "adamw", steps=3), "--ep", 2, "--out", first)
    assert done.returncode == 0, done.stderr[-3000:]
    straight = tmp_path / "straight"  # one process: 3 steps, then 3 more in a new decay phase
    assert plain(*flags(corpus, cache, 1, "adamw", steps=3), "--out", straight).returncode == 0
    assert plain("--out", straight, "--resume", "--max-steps", 6, "--new-decay").returncode == 0
    for stage in ("shards-written", "moved-old"):
        run = tmp_path / stage
        shutil.copytree(first, run)
        partial = run / "checkpoint.new"
        shutil.copytree(run / "checkpoint", partial)
        for name in ("checksums.json", "trainer_state.pt", ".metadata"):  # rank 0's part never came
            (partial / name).unlink()
        if stage == "moved-old":
            os.replace(run / "checkpoint", run / "checkpoint.old")
        from moekit import load_model

        assert load_model(run) is not None
        done = torchrun(2, "--out", run, "--resume", "--ep", 2, "--max-steps", 6, "--new-decay")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed from" in done.stdout and "at step 3" in done.stdout and not partial.exists()
        assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
        assert_same_run(run, straight)
