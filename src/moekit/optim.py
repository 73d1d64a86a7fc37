"""Optimizers: Muon for hidden weight matrices, AdamW for everything else.

    opt, description = build_optimizer(model, kind="muon", lr=3e-3, muon_lr=0.02)
    print(description)                # which parameter went where, counts and sizes
    loss.backward(); opt.step(); opt.zero_grad()
    for g in opt.param_groups:        # an LR schedule scales every group from its base_lr
        g["lr"] = g["base_lr"] * factor

Muon (its Newton–Schulz coefficients, scaling and which weights it takes): docs/formulas.md,
"Optimizers". Expert weights (E, rows, cols) are orthogonalized per expert. The quintic does
not converge to exactly 1: after five steps the singular values lie in about [0.68, 1.20]
(the iteration's invariant band is [0.68, 1.13]) for every input singular value above
~0.0015 * ||G||_F; smaller ones stay smaller. That is the intended trade of speed for exactness.

Legend: E experts, M rows, N cols of the (last two dims of the) matrix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["CombinedOptimizer", "Muon", "build_optimizer", "newton_schulz5", "orthogonalize", "param_groups"]

NS_COEFFS = (3.4445, -4.7750, 2.0315)

# name components that keep a >= 2-D parameter out of Muon (embeddings, output head, routers)
_ADAMW_NAME_PARTS = {"embed", "embed_tokens", "wte", "wpe", "tok_embeddings", "lm_head",
                     "router", "gate", "noise_weight", "shared_gate", "shared_expert_gate"}


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T, G (..., M, N), with quintic Newton–Schulz steps in
    float32 (transposed when M > N, so A = X X^T is the smaller side); G's shape and dtype."""
    if G.dim() < 2:
        raise ValueError(f"newton_schulz5 needs a (..., M, N) tensor, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.float()
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, ord="fro", keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype).contiguous()


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """`newton_schulz5` of whole matrices. A DTensor (an FSDP shard, moekit/dist/fsdp.py) is gathered to its
    full tensor, orthogonalized (every rank the same), and its own shard kept: the single-process update."""
    if not hasattr(update, "full_tensor"):  # a plain tensor (DTensor is not imported by one process)
        return newton_schulz5(update, steps=steps)
    from torch.distributed.tensor import DTensor, Replicate

    mesh = update.device_mesh
    full = newton_schulz5(update.full_tensor(), steps=steps)
    return DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
        mesh, update.placements)


class Muon(torch.optim.Optimizer):
    """Momentum SGD with orthogonalized updates for (..., rows, cols) weights (plain tensors, or FSDP-sharded
    DTensors: `orthogonalize` works on each whole matrix).

    Per parameter p with gradient g:
        buf = momentum * buf + g
        u = g + momentum * buf  (nesterov)  or  buf
        u = newton_schulz5(u) * sqrt(max(1, rows / cols))   (over the last two dims)
        p *= 1 - lr * weight_decay;  p -= lr * u
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"Muon lr={lr} must be >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum={momentum} must be in [0, 1)")
        if ns_steps < 0:
            raise ValueError(f"Muon ns_steps={ns_steps} must be >= 0")
        if weight_decay < 0:
            raise ValueError(f"Muon weight_decay={weight_decay} must be >= 0")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon only handles parameters with >= 2 dims, got shape {tuple(p.shape)}; "
                                     "use AdamW for vectors and scalars")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(g)
                update = g.add(buf, alpha=mom) if group["nesterov"] else buf
                update = orthogonalize(update, steps=group["ns_steps"])
                scale = math.sqrt(max(1.0, p.shape[-2] / p.shape[-1]))  # rows / cols
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * scale)
        return loss


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{"muon": parameters with >= 2 dims except embeddings, the LM head, routers and
    shared-expert gates; "adamw": the rest}. Tied parameters appear once, under their first name."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": []}
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        muon = p.dim() >= 2 and id(p) not in embedding_ids and not _ADAMW_NAME_PARTS.intersection(name.split("."))
        groups["muon" if muon else "adamw"].append((name, p))
    return groups


class CombinedOptimizer:
    """Several torch optimizers stepped together, with one state_dict. `param_groups` lists every
    group of every optimizer, each with "lr", "base_lr" (for schedulers) and "name"."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers)
        for opt_name, opt in self.optimizers.items():
            for i, group in enumerate(opt.param_groups):
                group.setdefault("base_lr", group["lr"])
                group.setdefault("name", opt_name if len(opt.param_groups) == 1 else f"{opt_name}.{i}")

    @property
    def param_groups(self) -> list:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != set(self.optimizers):
            raise ValueError(f"optimizer state has parts {sorted(sd)}, this optimizer has {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(sd[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={type(v).__name__}" for k, v in self.optimizers.items())
        return f"CombinedOptimizer({inner})"


def _compress_names(names: Iterable[str]) -> list[str]:
    """'layers.0.attn.q_proj.weight', 'layers.1.attn.q_proj.weight' -> ['layers.*.attn.q_proj.weight x2']."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", n)
        counts[key] = counts.get(key, 0) + 1
    return [k if c == 1 else f"{k} x{c}" for k, c in counts.items()]


def build_optimizer(model: nn.Module, kind: str = "adamw", lr: float = 3e-3, weight_decay: float = 0.1,
                    betas=(0.9, 0.95), muon_lr: float = 0.02,
                    muon_momentum: float = 0.95) -> tuple[CombinedOptimizer, str]:
    """(optimizer, description of the grouping) for `model`. kind "adamw": one AdamW, weight decay
    on >= 2-D parameters only; kind "muon": Muon (muon_lr, muon_momentum, the same decoupled
    weight decay) for the "muon" group of `param_groups(model)`, that AdamW for the rest."""
    if kind not in ("adamw", "muon"):
        raise ValueError(f"unknown optimizer kind={kind!r}; expected 'adamw' or 'muon'")
    split = param_groups(model)
    muon_named = split["muon"] if kind == "muon" else []
    adamw_named = split["adamw"] if kind == "muon" else split["muon"] + split["adamw"]
    decay = [(n, p) for n, p in adamw_named if p.dim() >= 2]
    no_decay = [(n, p) for n, p in adamw_named if p.dim() < 2]

    optimizers: dict[str, torch.optim.Optimizer] = {}
    described = []
    if muon_named:
        optimizers["muon"] = Muon([{"params": [p for _, p in muon_named], "name": "muon"}], lr=muon_lr,
                                  momentum=muon_momentum, nesterov=True, weight_decay=weight_decay)
        described.append(("muon", f"Muon lr={muon_lr} momentum={muon_momentum} nesterov wd={weight_decay}",
                          muon_named))
    adamw_groups = []
    for name, named, wd in (("adamw_decay", decay, weight_decay), ("adamw_no_decay", no_decay, 0.0)):
        if named:
            adamw_groups.append({"params": [p for _, p in named], "weight_decay": wd, "name": name})
            described.append((name, f"AdamW lr={lr} betas={tuple(betas)} wd={wd}", named))
    if adamw_groups:
        optimizers["adamw"] = torch.optim.AdamW(adamw_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if not optimizers:
        raise ValueError("build_optimizer: the model has no parameters")
    total = sum(p.numel() for named in split.values() for _, p in named)
    lines = [f"optimizer {kind}: {total:,} params in {sum(len(v) for v in split.values())} tensors"]
    for title, settings, named in described:
        lines.append(f"{title} ({settings}): {len(named)} tensors, {sum(p.numel() for _, p in named):,} params")
        lines.extend(f"    {n}" for n in _compress_names(n for n, _ in named))
    return CombinedOptimizer(optimizers), "\n".join(lines)
