"""Quick demo: train a tiny MoE layer on a teacher-student regression, then benchmark a small shape.

A fixed random teacher MoE (the "tiny" preset, its own seed) maps fresh random inputs (256
tokens per step) to targets; a student of the same configuration (grouped backend,
softmax_topk, Switch aux loss 0.01) learns them with AdamW (lr 3e-3) on MSE + aux loss,
calling `update_expert_bias()` after every step. Losses are the MSE on a fixed held-out
batch; the imbalance is max/mean tokens per expert on it.

    python -m moekit.bench.demo [--steps 1000] [--seed 0] [--no-bench]

Legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .. import cliargs
from ..config import MoEConfig
from ..moe import MoE
from . import moe_layer

BATCH_TOKENS = 256
EVAL_TOKENS = 1024
BENCH_SHAPES = [(1024, 256, 64, 32, 4)]


@torch.no_grad()
def _evaluate(student: MoE, teacher: MoE, x_TD: torch.Tensor):
    """(held-out MSE, tokens-per-expert max/mean) of the student in eval mode."""
    was_training = student.training
    student.eval()
    y_TD, aux = student(x_TD)
    student.train(was_training)
    mse = F.mse_loss(y_TD, teacher(x_TD)[0]).item()
    load_E = aux.tokens_per_expert.float()
    return mse, (load_E.max() / load_E.mean()).item()


def run_demo(steps: int = 1000, seed: int = 0, lr: float = 3e-3, log_every: int = 100, verbose: bool = True) -> dict:
    """Train the student for `steps` AdamW steps; returns initial/final held-out MSE and the final imbalance."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = MoEConfig.preset("tiny", router="softmax_topk", aux_loss_coef=0.01, experts_impl="grouped")
    torch.manual_seed(seed + 1)
    teacher = MoE(cfg).eval().requires_grad_(False)
    torch.manual_seed(seed)
    student = MoE(cfg)
    gen = torch.Generator().manual_seed(seed + 2)
    xeval_TD = torch.randn(EVAL_TOKENS, cfg.d_model, generator=gen)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)

    initial_loss, initial_imbalance = _evaluate(student, teacher, xeval_TD)
    if verbose:
        print(f"demo: tiny MoE (D={cfg.d_model}, F={cfg.d_expert}, E={cfg.num_experts}, K={cfg.top_k}, "
              f"{cfg.router}, {cfg.experts_impl}), teacher-student regression, {steps} steps x {BATCH_TOKENS} tokens")
        print(f"  held-out mse {initial_loss:.4f}, tokens/expert max/mean {initial_imbalance:.2f} (before training)")
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x_TD = torch.randn(BATCH_TOKENS, cfg.d_model, generator=gen)
        with torch.no_grad():
            target_TD = teacher(x_TD)[0]
        y_TD, aux = student(x_TD)
        mse = F.mse_loss(y_TD, target_TD)
        loss = mse + aux.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        student.update_expert_bias()
        if verbose and (step % log_every == 0 or step == steps):
            print(f"  step {step:4d}  loss {loss.item():.4f}  (mse {mse.item():.4f}, aux {aux.loss.item():.4f})")
    seconds = time.perf_counter() - t0

    final_loss, imbalance = _evaluate(student, teacher, xeval_TD)
    if verbose:
        print(f"  held-out mse {initial_loss:.4f} -> {final_loss:.4f} ({final_loss / initial_loss:.1%} of initial) "
              f"in {seconds:.1f} s; tokens/expert max/mean {initial_imbalance:.2f} -> {imbalance:.2f}")
    return {"initial_loss": initial_loss, "final_loss": final_loss, "imbalance": imbalance,
            "initial_imbalance": initial_imbalance, "steps": steps, "seconds": seconds}


def main(argv=None) -> int:
    """Command-line entry; returns the exit status 0 (results are printed; use run_demo for the dict)."""
    p = cliargs.parser("moekit bench demo", "Train a tiny MoE layer on a teacher-student regression, then "
                       "benchmark a small shape.")
    p.add_argument("--steps", type=int, default=1000, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (teacher, student init and data)")
    p.add_argument("--no-bench", action="store_true", help="skip the small MoE-layer benchmark")
    args = p.parse_args(argv)
    run_demo(steps=args.steps, seed=args.seed)
    if not args.no_bench:
        with_hf = moe_layer.hf_unavailable_reason() is None
        print()
        rows = moe_layer.run(BENCH_SHAPES, ["float32"], warmup=1, iters=3, with_hf=with_hf, progress=False)
        print(moe_layer.format_table(rows))
    return 0


if __name__ == "__main__":
    main()
