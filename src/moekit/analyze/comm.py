"""Communication of expert and data parallelism (docs/formulas.md#communication): the bytes one rank's
all-to-alls (expert parallelism, EP) and FSDP all-gathers / reduce-scatters move per training step, the
time they take over a catalog GPU's NVLink and InfiniBand, and the step time with them.

Layout (torchtitan's, as moekit.dist builds it): dp data-parallel ranks (the whole world); EP groups of
ep consecutive ranks inside them; each rank holds E/ep experts, sharded over the dp/ep ranks that hold
the same experts (stride ep); dense weights sharded over all dp ranks. A node holds dp/nodes consecutive
ranks. Bytes are what one rank sends (= what it receives, under uniform routing and ring collectives).

Step time: compute = tokens per rank x training FLOPs per token / peak (no MFU discount). FSDP's
collectives run beside compute (FSDP2 prefetches the next all-gather) and the all-to-all does not (the
experts wait for it): step = max(compute, FSDP) + all-to-all; `step_serial_s` adds all three.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

from .arch import Arch
from .hardware import Hardware
from .params import params_by_component

GATE_BYTES = 4  # a pair's gate travels with its row, in float32 (routing math runs in float32)
COUNT_BYTES = 8  # int64 per-expert token counts, exchanged once per MoE layer per forward
FORMULAS = {
    "a2a_forward": "K·(d·b + g)·(ep−1)/ep dispatch + K·d·b·(ep−1)/ep combine, per token per MoE layer",
    "a2a_training": "forward + backward K·(2·d·b + g)·(ep−1)/ep, x tokens x MoE layers, + 8·E·(ep−1)/ep "
                    "counts",
    "fsdp": "all-gather P_dense·(dp−1)/dp + P_experts/ep·(dp/ep−1)/(dp/ep) bytes, forward and again in "
            "backward (less the root's embeddings, final norm, head); reduce-scatter the same",
    "link": "in a node: NVLink (PCIe without it); across nodes: node InfiniBand / GPUs per node",
    "step": "max(compute, FSDP) + all-to-all (FSDP overlapped, all-to-all exposed)",
}


def a2a_bytes_per_token(d: int, K: int, ep: int, act_bytes: float, gate_bytes: float = GATE_BYTES) -> Dict[str, float]:
    """Bytes one token's routed pairs send to other ranks in one MoE layer (moekit.dist.ep). Under uniform
    routing (ep-1)/ep of the K pairs live on another rank. Forward: dispatch sends each such pair's row
    (d values at act_bytes) and its gate (gate_bytes; the local expert ids are rebuilt from the counts,
    not sent), combine brings the gate-weighted output row back. Backward: the autograd all-to-alls send
    the rows' and the gates' gradients the other way."""
    leave = (ep - 1) / ep
    row = d * act_bytes
    dispatch, combine = K * (row + gate_bytes) * leave, K * row * leave
    backward = K * (2 * row + gate_bytes) * leave
    return {"dispatch": dispatch, "combine": combine, "forward": dispatch + combine, "backward": backward,
            "training": dispatch + combine + backward}


def a2a_count_bytes(num_experts: int, ep: int) -> float:
    """The per-expert counts one rank sends before a layer's dispatch: E/ep int64 to each other rank."""
    return COUNT_BYTES * num_experts * (ep - 1) / ep


def fsdp_bytes_per_step(dense_bytes: float, expert_bytes: float, dp: int, ep: int,
                        root_bytes: float = 0.0) -> Dict[str, float]:
    """Bytes one rank receives by FSDP's all-gathers and sends by the gradients' reduce-scatter (at the
    parameter dtype) in a step of one micro-batch: each moves (s-1)/s of the bytes sharded over s ranks.
    Dense weights are sharded over dp ranks, a rank's E/ep experts over the dp/ep ranks that hold them.
    Parameters are all-gathered in forward and again in backward (resharded after forward), except the
    root module's own, root_bytes of the dense ones (embeddings, final norm, head: FSDP2 keeps the root
    unsharded until backward)."""
    s = dp // ep
    dense = dense_bytes * (dp - 1) / dp
    experts = expert_bytes / ep * (s - 1) / s
    root = root_bytes * (dp - 1) / dp
    gather = dense + experts
    return {"dense": dense, "experts": experts, "root": root, "all_gather_forward": gather,
            "all_gather_backward": gather - root, "reduce_scatter": gather, "total": 3 * gather - root}


def nodes_spanned(size: int, stride: int, gpus_per_node: int) -> int:
    """How many nodes a group of `size` ranks {0, stride, 2·stride, ...} spans, consecutive ranks per node."""
    return len({i * stride // gpus_per_node for i in range(size)})


def ring_seconds(nbytes: float, size: int, stride: int, gpus_per_node: int, hw: Hardware) -> float:
    """A ring collective moving nbytes per rank runs at its slowest link: InfiniBand (the node's bandwidth
    shared by its GPUs) once the group spans nodes, NVLink inside one."""
    if size <= 1 or nbytes == 0:
        return 0.0
    bw = hw.node_bw / gpus_per_node if nodes_spanned(size, stride, gpus_per_node) > 1 else hw.link_bw
    return nbytes / bw


def a2a_seconds(nbytes: float, ep: int, gpus_per_node: int, hw: Hardware) -> float:
    """All-to-all of nbytes per rank spread evenly over its ep-1 peers: the peers in the same node over
    NVLink and the others over InfiniBand at the same time; it takes the slower of the two."""
    if ep <= 1 or nbytes == 0:
        return 0.0
    inside = min(ep, gpus_per_node) - 1
    per_peer = nbytes / (ep - 1)
    t_nvlink = per_peer * inside / hw.link_bw if inside else 0.0
    t_ib = per_peer * (ep - 1 - inside) / (hw.node_bw / gpus_per_node) if ep - 1 > inside else 0.0
    return max(t_nvlink, t_ib)


def check_layout(arch: Arch, hw: Hardware, dp: int, ep: int, nodes: Optional[int]) -> int:
    """Refuse impossible layouts with the numbers; return the number of nodes."""
    for name, value in (("--dp", dp), ("--ep", ep)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    moe = arch.moe
    if ep > 1 and moe is None:
        raise ValueError(f"--ep {ep} needs an MoE model; {arch.name} has no routed experts")
    if moe is not None and moe.num_experts % ep:
        raise ValueError(f"num_experts={moe.num_experts} is not divisible by --ep {ep}")
    if dp % ep:
        raise ValueError(f"--ep {ep} does not divide --dp {dp}: expert-parallel ranks are data-parallel ranks")
    if dp > 1 and not hw.link_bw:
        raise ValueError(f"no interconnect figures for --hardware {hw.name}; choose a catalog GPU "
                         f"(a100, h100, h200, b200, rtx4090, t4)")
    if nodes is None:
        nodes = math.ceil(dp / hw.gpus_per_node) if hw.gpus_per_node else 1
    if not isinstance(nodes, int) or nodes <= 0 or dp % nodes:
        raise ValueError(f"--nodes {nodes} must be a positive integer that divides --dp {dp}")
    if dp // nodes > hw.gpus_per_node:
        raise ValueError(f"--dp {dp} on {nodes} node(s) puts {dp // nodes} GPUs in a node; a {hw.name} node "
                         f"holds {hw.gpus_per_node} (raise --nodes)")
    if nodes > 1 and not hw.node_bw:
        raise ValueError(f"no InfiniBand figure for --hardware {hw.name}: use --nodes 1")
    return nodes


def ep_divisors(dp: int, num_experts: int) -> List[int]:
    """The EP degrees a layout allows: divisors of both dp and E."""
    g = math.gcd(dp, num_experts)
    return [e for e in range(1, g + 1) if g % e == 0]


def step_bytes(arch: Arch, dp: int, ep: int, tokens: int, param_bytes: float, act_bytes: float) -> Dict:
    """What one rank's collectives move in a training step of `tokens` tokens per rank: `a2a` (per token
    per MoE layer, and `a2a_step` for the step, counts included) and `fsdp` (fsdp_bytes_per_step)."""
    by_comp = params_by_component(arch)
    expert_bytes = by_comp["experts"] * param_bytes
    dense_bytes = sum(by_comp.values()) * param_bytes - expert_bytes
    moe = arch.moe
    n_moe = len(arch.moe_ffns)
    a2a = (a2a_bytes_per_token(arch.d_model, moe.top_k, ep, act_bytes) if moe
           else dict.fromkeys(("dispatch", "combine", "forward", "backward", "training"), 0.0))
    a2a_step = (a2a["training"] * tokens + (a2a_count_bytes(moe.num_experts, ep) if moe else 0)) * n_moe
    final_norm = (2 if arch.norm == "layernorm" else 1) * arch.d_model if arch.vocab_size else 0
    root_bytes = (by_comp["embedding"] + by_comp["head"] + final_norm) * param_bytes
    fsdp = fsdp_bytes_per_step(dense_bytes, expert_bytes, dp, ep, root_bytes)
    return {"a2a": a2a, "a2a_step": a2a_step, "fsdp": fsdp,
            "gathered_expert_bytes_per_layer": expert_bytes / max(n_moe, 1) / ep}


def one_layout(arch: Arch, hw: Hardware, dp: int, ep: int, nodes: int, tokens: int, param_bytes: float,
               act_bytes: float, compute_s: float) -> Dict:
    """Bytes and seconds of one (dp, ep) layout; tokens = tokens per rank per step."""
    gpn = dp // nodes
    moe = arch.moe
    b = step_bytes(arch, dp, ep, tokens, param_bytes, act_bytes)
    a2a, a2a_step, fsdp = b["a2a"], b["a2a_step"], b["fsdp"]
    t_a2a = a2a_seconds(a2a_step, ep, gpn, hw)
    t_fsdp = (ring_seconds(3 * fsdp["dense"] - fsdp["root"], dp, 1, gpn, hw)
              + ring_seconds(3 * fsdp["experts"], dp // ep, ep, gpn, hw))
    step = max(compute_s, t_fsdp) + t_a2a
    return {"dp": dp, "ep": ep, "nodes": nodes, "gpus_per_node": gpn, "tokens_per_rank": tokens,
            "experts_per_rank": moe.num_experts // ep if moe else 0,
            "a2a_bytes_per_token_per_layer": a2a, "a2a_bytes_per_step": a2a_step,
            "fsdp_bytes_per_step": fsdp,
            "gathered_expert_bytes_per_layer": b["gathered_expert_bytes_per_layer"],
            "a2a_link": "none" if ep == 1 else "in node" if ep <= gpn else "across nodes",
            "fsdp_link": "none" if dp == 1 else "across nodes" if nodes > 1 else "in node",
            "compute_s": compute_s, "a2a_s": t_a2a, "fsdp_s": t_fsdp, "step_s": step,
            "step_serial_s": compute_s + t_fsdp + t_a2a, "tokens_per_s": dp * tokens / step}


def communication(arch: Arch, hw: Hardware, dp: int, ep: int, nodes: Optional[int], tokens: int,
                  param_bytes: float, act_bytes: float, flops_per_token_training: float, peak: float) -> Dict:
    """The report's `communication` section: the layout asked for, and the same dp over every EP degree
    (`by_ep`, to see when EP pays off). tokens: per rank per step; param_bytes: bytes per parameter as
    FSDP gathers them; act_bytes: bytes per activation value."""
    nodes = check_layout(arch, hw, dp, ep, nodes)
    compute_s = tokens * flops_per_token_training / peak
    out = one_layout(arch, hw, dp, ep, nodes, tokens, param_bytes, act_bytes, compute_s)
    degrees = ep_divisors(dp, arch.moe.num_experts) if arch.moe else [1]
    out["by_ep"] = [one_layout(arch, hw, dp, e, nodes, tokens, param_bytes, act_bytes, compute_s) for e in degrees]
    out["best_ep"] = min(out["by_ep"], key=lambda r: (r["step_s"], r["ep"]))["ep"]
    out["assumption"] = ("uniform routing; FSDP overlapped with compute, all-to-all exposed: "
                         "step = max(compute, FSDP) + all-to-all; compute at peak FLOP/s")
    return out
