"""Distributed training on CPU (gloo): tokens/s and the share of time in all-to-all and FSDP collectives at
1, 2 and 4 processes, and the bytes the collectives move against the analyzer's model (analyze/comm.py).

Question: what do FSDP2 and expert parallelism cost on one machine, and does `moekit analyze --dp --ep`
count the bytes they move right?

    python benchmarks/distributed.py                          # 1, 2 and 4 processes, table
    python benchmarks/distributed.py --procs 1,2 --steps 4    # fewer
    python benchmarks/distributed.py --json                   # one JSON object per run

Each run trains the --preset (default tiny) model in fp32 on one fixed global batch of --batch sequences of
--seq random tokens (torch.Generator(--seed)), split evenly over the ranks: every row is the same training
math as one process on the whole batch. One step, as moekit's trainer does it: forward, cross-entropy +
MoE aux loss, backward, gradient clipping at 1.0, AdamW, update_expert_biases. The 1-process run is the
plain model (no torch.distributed), once with all torch threads and once with 1; N > 1 runs
`python -m torch.distributed.run --standalone --nproc-per-node N benchmarks/distributed.py --worker ...`
(gloo, 1 thread per process as torchrun sets it) with `moekit.dist.fsdp.parallelize(model, meshes,
Layout(ep=E))`: FSDP2 over all N ranks, experts split over EP groups of E ranks and sharded over the N/E
ranks holding the same experts. Rows: N=1; for each N, E = 1 (FSDP only) and every E up to N that
divides N and the expert count.

Measured on rank 0:
- tokens/s: global tokens per step / median time of --steps steps (after --warmup steps), uninstrumented.
- collective shares: one more step under torch.profiler; the duration of its gloo:all_to_all,
  gloo:all_gather + gloo:reduce_scatter (FSDP) and gloo:all_reduce events (global balancing's sums and
  the gradient norm) over the step's wall time. Each event runs from launch to completion on gloo's
  thread: it includes waiting for the slowest peer, and the main thread may compute meanwhile.
- bytes: in that step `CollectiveBytes`, a TorchDispatchMode, sees every collective op (c10d and
  functional) and counts what this rank sends to other ranks (all-to-all: its input rows but those
  for itself; reduce-scatter: input minus output) or receives (all-gather: output minus input),
  beside comm.step_bytes's prediction for the same layout. The all-to-all prediction assumes uniform
  routing, so it differs from the measurement by the routing's imbalance; FSDP's by shard padding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit  # noqa: E402
from machine import print_machine_header  # noqa: E402

KINDS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")


class CollectiveBytes(TorchDispatchMode):
    """Bytes this rank's collectives move, by kind, as the dispatcher sees the ops (`bytes[kind]`).
    `groups`: the process groups of functional collectives (they name their group by group_name)."""

    def __init__(self, groups=()):
        super().__init__()
        import torch.distributed as dist

        self.named = {g.group_name: (dist.get_rank(g), g.size()) for g in groups}
        self.bytes = Counter()
        self.calls = Counter()

    def rank_size(self, group):
        if isinstance(group, str):
            return self.named[group]
        pg = torch.distributed.ProcessGroup.unbox(group)
        return pg.rank(), pg.size()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if name in ("c10d::alltoall_base_", "_c10d_functional::all_to_all_single"):
            if name.startswith("c10d"):
                x, (rank, size), splits = args[1], self.rank_size(args[2]), args[4]
            else:
                x, (rank, size), splits = args[0], self.rank_size(args[3]), args[2]
            rows = x.shape[0] if x.dim() else 1
            splits = list(splits) if splits else [rows // size] * size
            row_bytes = x.nbytes / rows if rows else 0
            self.add("all_to_all", (rows - splits[rank]) * row_bytes)
        elif name == "c10d::_allgather_base_":
            self.add("all_gather", args[0].nbytes - args[1].nbytes)
        elif name == "_c10d_functional::all_gather_into_tensor":
            self.add("all_gather", args[0].nbytes * (args[1] - 1))
        elif name == "c10d::_reduce_scatter_base_":
            self.add("reduce_scatter", args[1].nbytes - args[0].nbytes)
        elif name == "_c10d_functional::reduce_scatter_tensor":
            self.add("reduce_scatter", args[0].nbytes * (args[2] - 1) / args[2])
        elif name == "c10d::allreduce_":
            self.add("all_reduce", sum(t.nbytes for t in args[0]))
        elif name == "_c10d_functional::all_reduce":
            self.add("all_reduce", args[0].nbytes)
        elif name.startswith(("c10d::", "_c10d_functional::")) and not any(w in name for w in ("wait", "wrap")):
            self.add(name, 0)
        return out

    def add(self, kind, nbytes):
        self.bytes[kind] += nbytes
        self.calls[kind] += 1


def global_batch(cfg, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def build(preset, seed, env, ep):
    """The model of one device (same seed on every rank), parallelized under torchrun; the clip function."""
    from moekit import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, dtype="float32")
    model = Transformer(cfg)
    if env is None:
        return cfg, model, None, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    from moekit.dist.fsdp import clip_grad_norm, parallelize
    from moekit.dist.mesh import Layout, build_meshes

    layout = Layout(ep=ep).check(env.world_size, cfg.moe.num_experts if cfg.moe else None)
    meshes = build_meshes(env, layout)
    parallelize(model, meshes, layout)
    return cfg, model, meshes, lambda: clip_grad_norm(model, 1.0)


def worker(args) -> dict:
    from moekit.dist.mesh import init_distributed
    from moekit.moe import update_expert_biases

    env = init_distributed()
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, meshes, clip = build(args.preset, args.seed, env, args.ep)
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} is not divisible by {world} processes")
    b = args.batch // world
    x_BT, y_BT = (t[rank * b:(rank + 1) * b] for t in global_batch(cfg, args.batch, args.seq, args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def step():
        logits_BTV = model(x_BT)
        ce = F.cross_entropy(logits_BTV.float().view(-1, logits_BTV.shape[-1]), y_BT.reshape(-1))
        (ce + model.moe_aux().loss).backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_biases(model)
        return ce.item()

    def barrier():
        if env is not None:
            torch.distributed.barrier()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    # one instrumented step: collective durations (profiler) and bytes (dispatch mode)
    groups = [meshes.ep.get_group(), meshes.dp.get_group(), meshes.dp_mod_ep.get_group()] if meshes else []
    counter = CollectiveBytes(groups) if env is not None else None
    barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        if counter is not None:
            with counter:
                step()
        else:
            step()
        wall = time.perf_counter() - t0
    seconds = Counter()
    for e in prof.events():
        if e.name.startswith("gloo:"):
            seconds[e.name[5:]] += e.time_range.elapsed_us() / 1e6
    out = {"procs": world, "ep": args.ep if env else 1, "threads": torch.get_num_threads(), "preset": args.preset,
           "tokens_per_step": args.batch * args.seq, "step_s": statistics.median(times),
           "tokens_per_s": args.batch * args.seq / statistics.median(times), "profiled_step_s": wall,
           "share": {"all_to_all": seconds["all_to_all"] / wall,
                     "fsdp": (seconds["all_gather"] + seconds["reduce_scatter"]) / wall,
                     "all_reduce": seconds["all_reduce"] / wall},
           "measured_bytes": dict(counter.bytes) if counter else {}, "calls": dict(counter.calls) if counter else {}}
    out["predicted_bytes"] = predicted(cfg, world, out["ep"], b * args.seq)
    if env is not None:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out if rank == 0 else None


def predicted(cfg, dp, ep, tokens) -> dict:
    """comm.step_bytes for this layout in fp32 (4-byte parameters and activations)."""
    from moekit.analyze import from_model_config
    from moekit.analyze.comm import step_bytes

    b = step_bytes(from_model_config(cfg), dp, ep, tokens, 4, 4)
    f = b["fsdp"]
    return {"all_to_all": b["a2a_step"], "all_gather": f["all_gather_forward"] + f["all_gather_backward"],
            "reduce_scatter": f["reduce_scatter"]}


def layouts(procs, num_experts):
    """(processes, ep, threads): one process with all torch threads and with 1 (as each torchrun worker
    has), then every N > 1 with each EP degree dividing N and E."""
    for n in procs:
        if n == 1:
            yield 1, 1, 0
            yield 1, 1, 1
        for e in ([] if n == 1 else [e for e in range(1, n + 1) if n % e == 0 and num_experts % e == 0]):
            yield n, e, 0


def launch(args, n, ep, threads) -> dict:
    worker_argv = [str(Path(__file__).resolve()), "--worker", "--preset", args.preset, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--seed", str(args.seed), "--ep", str(ep), "--threads", str(threads)]
    if n == 1:
        cmd = [sys.executable, *worker_argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *worker_argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode or not lines:
        raise SystemExit(f"run with {n} process(es), ep {ep} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def mib(x):
    return f"{x / 2**20:.3f}"


def table(rows) -> str:
    base = rows[0]["tokens_per_s"]
    out = ["procs | ep | threads/proc | tokens/s | vs 1 process | ms/step | all-to-all share | FSDP share | "
           "all-reduce share (balancing, grad norm) | all-to-all MiB measured / predicted | all-gather MiB m / p | "
           "reduce-scatter MiB m / p",
           "---|---|---|---|---|---|---|---|---|---|---|---"]
    for r in rows:
        m, p = r["measured_bytes"], r["predicted_bytes"]
        pair = lambda k: f"{mib(m.get(k, 0))} / {mib(p[k])}" if r["procs"] > 1 else "—"  # noqa: E731
        out.append(f"{r['procs']} | {r['ep']} | {r['threads']} | {r['tokens_per_s']:.0f} | "
                   f"{r['tokens_per_s'] / base:.2f}x | {r['step_s'] * 1e3:.0f} | {r['share']['all_to_all']:.0%} | "
                   f"{r['share']['fsdp']:.0%} | {r['share']['all_reduce']:.0%} | {pair('all_to_all')} | "
                   f"{pair('all_gather')} | {pair('reduce_scatter')}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2,4", help="process counts, comma-separated")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over the ranks")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ep", type=int, default=1, help="(worker) expert-parallel degree")
    p.add_argument("--threads", type=int, default=0, help="(worker) torch threads (0: leave as started)")
    p.add_argument("--worker", action="store_true", help="run one configuration in this process (under torchrun)")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    args = p.parse_args(argv)
    if args.worker:
        out = worker(args)
        if out is not None:
            print(json.dumps(out), flush=True)
        return
    print_machine_header()
    from moekit import ModelConfig

    procs = [int(n) for n in args.procs.split(",")]
    load = os.getloadavg()[0]
    cfg = ModelConfig.preset(args.preset)
    rows = []
    for n, ep, threads in layouts(procs, cfg.moe.num_experts if cfg.moe else 1):
        rows.append(launch(args, n, ep, threads))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(f"commit {git_commit()}; preset {args.preset}, fp32, global batch {args.batch} x {args.seq} tokens, "
              f"{args.warmup} warm-up + {args.steps} timed steps (median), seed {args.seed}; 1-minute load "
              f"average {load:.1f} before, {os.getloadavg()[0]:.1f} after\n")
        print(table(rows))


if __name__ == "__main__":
    main()
