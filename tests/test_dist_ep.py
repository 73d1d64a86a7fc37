"""Expert parallelism and global balancing on CPU with gloo, against one process on the global batch.

The test launches this file under torchrun (`python -m torch.distributed.run --standalone`); each
rank builds the same single-process MoE layer (the reference, run on the whole global batch) and
a copy transformed by moekit.dist.ep, runs its own slice of the batch, and writes the largest
differences to a JSON file per rank; the test asserts on them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.dist.mesh import Layout, finish_and_exit, init_distributed

HERE = Path(__file__).resolve()

# name: (layout, MoEConfig overrides, bias of the experts forced out, global batch size)
LAYER_CASES = {
    "softmax_ep2": (dict(ep=2), dict(router="softmax_topk", num_shared_experts=1), [5], 4),
    "sigmoid_groups_ep2": (dict(ep=2), dict(router="sigmoid_topk", num_groups=4, topk_groups=2, top_k=3), [7], 4),
    "ep2_rank0_gets_nothing": (dict(ep=2), dict(router="softmax_topk"), [0, 1, 2, 3], 4),
    "softmax_ep4": (dict(ep=4), dict(router="softmax_topk", num_shared_experts=1), [2], 4),
    "sigmoid_groups_ep4": (dict(ep=4), dict(router="sigmoid_topk", num_groups=4, topk_groups=2, top_k=3), [0, 1], 4),
    "ep2_dp4": (dict(ep=2), dict(router="sigmoid_topk", num_groups=2, topk_groups=1), [6], 4),
}
BIAS_CASES = {"bias_ep1": dict(ep=1), "bias_ep2": dict(ep=2)}
TOL = 1e-6


# ----------------------------------------------------------------- worker side (under torchrun)

def moe_config(**overrides):
    from moekit.moe import MoEConfig

    base = dict(d_model=16, d_expert=8, num_experts=8, top_k=2, norm_topk_prob=True, aux_loss_coef=0.01,
                seq_aux_loss_coef=0.02, z_loss_coef=0.001)
    return MoEConfig(**{**base, **overrides})


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the reference's largest magnitude when that is above 1."""
    if not a.numel():
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def summed(t: torch.Tensor, mesh) -> torch.Tensor:
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t, group=mesh.get_group())
    return t


def run_layer_case(env, meshes_for, name):
    from moekit.bench.memory import saved_bytes
    from moekit.dist.ep import apply_expert_parallel, apply_global_balancing, local
    from moekit.moe import MoE
    from moekit.numerics import PLAIN

    layout, overrides, starved, batch = LAYER_CASES[name]
    meshes = meshes_for(layout)
    torch.manual_seed(0)
    ref = MoE(moe_config(**overrides)).train()
    with torch.no_grad():
        ref.router.expert_bias[starved] = -10.0  # these experts receive no tokens at all
    moe = copy.deepcopy(ref)
    apply_global_balancing(apply_expert_parallel(moe, meshes.ep), meshes.dp)

    x = torch.randn(batch, 6, 16)
    gy = torch.randn(batch, 6, 16)
    x_ref = x.clone().requires_grad_()
    y_ref, aux_ref = ref(x_ref)
    ((y_ref * gy).sum() + aux_ref.loss).backward()

    n, r = env.world_size, env.rank
    rows = slice(r * batch // n, (r + 1) * batch // n)
    x_r = x[rows].clone().requires_grad_()
    y_r, aux_r = moe(x_r)
    # every rank's aux.loss is the global one; its backward sums all ranks' gradients, hence the 1/n
    ((y_r * gy[rows]).sum() + aux_r.loss / n).backward()

    J = moe.cfg.num_experts // meshes.ep.size()
    block = slice(meshes.ep.get_local_rank() * J, (meshes.ep.get_local_rank() + 1) * J)
    out = {
        "y": max_diff(y_r, y_ref[rows]),
        "x.grad": max_diff(x_r.grad, x_ref.grad[rows]),
        "router.grad": max_diff(summed(moe.router.weight.grad, meshes.dp), ref.router.weight.grad),
        "loss": max_diff(aux_r.loss, aux_ref.loss),
        "switch": max_diff(aux_r.switch_loss, aux_ref.switch_loss),
        "seq": max_diff(aux_r.seq_aux_loss, aux_ref.seq_aux_loss),
        "z": max_diff(aux_r.z_loss, aux_ref.z_loss),
        "tokens_per_expert": max_diff(aux_r.tokens_per_expert, aux_ref.tokens_per_expert),
    }
    for w in ("w13", "w2"):  # expert gradients: the EP group's tokens; other EP groups add theirs
        grad = summed(local(getattr(moe.experts, w).grad), meshes.dp_mod_ep)
        out[f"{w}.grad"] = max_diff(grad, getattr(ref.experts, w).grad[block])
    if moe.shared is not None:
        out["shared.grad"] = max(max_diff(summed(p.grad, meshes.dp), q.grad)
                                 for p, q in zip(moe.shared.parameters(), ref.shared.parameters()))
    # the memory contract of the routed experts on this rank, measured on a second forward
    x_TD = x[rows].reshape(-1, 16).clone().requires_grad_()
    routing = moe.router(x_TD)
    weights = [local(moe.experts.w13), local(moe.experts.w2)]
    nbytes, _ = saved_bytes(lambda: moe.experts(x_TD, routing, PLAIN, False), params=weights)
    received = int(aux_ref.tokens_per_expert[block].sum()) if meshes.dp_mod_ep.size() == 1 else None
    return {"diffs": out, "saved_bytes": nbytes, "pairs_sent": routing.token_idx_P.numel(),
            "rows_received": received, "starved_grad": float(local(moe.experts.w13.grad).abs().sum())}


def run_bias_case(env, meshes_for, name, steps=5):
    import torch.distributed as dist

    from moekit.dist.ep import apply_expert_parallel, apply_global_balancing
    from moekit.moe import MoE

    meshes = meshes_for(BIAS_CASES[name])
    torch.manual_seed(1)
    ref = MoE(moe_config(router="sigmoid_topk", bias_update_speed=0.05)).train()
    moe = copy.deepcopy(ref)
    apply_global_balancing(apply_expert_parallel(moe, meshes.ep), meshes.dp)
    n, r = env.world_size, env.rank
    for _ in range(steps):
        x = torch.randn(2 * n, 5, 16)
        ref(x)[0].sum().backward()
        moe(x[2 * r: 2 * r + 2])[0].sum().backward()
        ref.update_expert_bias()
        moe.update_expert_bias()
    biases = [torch.empty_like(moe.router.expert_bias) for _ in range(n)]
    dist.all_gather(biases, moe.router.expert_bias)
    return {"vs_single": max_diff(moe.router.expert_bias, ref.router.expert_bias),
            "across_ranks": max(max_diff(b, biases[0]) for b in biases),
            "moved": max_diff(ref.router.expert_bias, torch.zeros_like(ref.router.expert_bias))}


def worker(out_dir: str, names) -> None:

    from moekit.dist.mesh import build_meshes

    torch.set_num_threads(1)
    env = init_distributed()
    results = {}
    for name in names:
        def meshes_for(layout):
            return build_meshes(env, Layout(**layout))
        results[name] = run_layer_case(env, meshes_for, name) if name in LAYER_CASES else \
            run_bias_case(env, meshes_for, name)
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(results))
    finish_and_exit(0)


# ----------------------------------------------------------------- test side

def launch(tmp_path: Path, nproc: int, names) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE), str(tmp_path), *names]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def check_layer(results, name):
    for rank, res in enumerate(results):
        case = res[name]
        bad = {k: v for k, v in case["diffs"].items() if not v <= TOL}
        assert not bad, f"{name} rank {rank}: differs from one process: {bad}"


def check_saved_bytes(case, F=8, D=16):
    """Saved by the routed experts: the received X (R, D) and H (R, 2F) in full, the gates and
    integer metadata within 64 bytes per pair sent or row received (grouped.py's contract)."""
    P, R = case["pairs_sent"], case["rows_received"]
    xh_bytes = R * (D + 2 * F) * 4
    assert xh_bytes <= case["saved_bytes"] <= 1.1 * xh_bytes + 64 * (P + R), case


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    names = ["softmax_ep2", "sigmoid_groups_ep2", "ep2_rank0_gets_nothing", *BIAS_CASES]
    return launch(tmp_path_factory.mktemp("ep2"), 2, names)


@pytest.mark.parametrize("name", ["softmax_ep2", "sigmoid_groups_ep2", "ep2_rank0_gets_nothing"])
def test_ep2_layer_equals_one_process(two_ranks, name):
    check_layer(two_ranks, name)
    for res in two_ranks:
        check_saved_bytes(res[name])


def test_ep_rank_without_tokens_gets_zero_expert_grads(two_ranks):
    # all of rank 0's experts are biased out: it receives no rows and its expert grads are zero
    assert two_ranks[0]["ep2_rank0_gets_nothing"]["rows_received"] == 0
    assert two_ranks[0]["ep2_rank0_gets_nothing"]["starved_grad"] == 0.0
    assert two_ranks[1]["ep2_rank0_gets_nothing"]["starved_grad"] > 0.0


@pytest.mark.parametrize("name", list(BIAS_CASES))
def test_expert_bias_is_global_and_equal_on_all_ranks(two_ranks, name):
    for rank, res in enumerate(two_ranks):
        case = res[name]
        assert case["moved"] > 0, "the bias did not move: the test proves nothing"
        assert case["across_ranks"] == 0.0, f"rank {rank}: ranks hold different biases"
        assert case["vs_single"] == 0.0, f"rank {rank}: bias differs from one process: {case}"


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ep4"), 4, ["softmax_ep4", "sigmoid_groups_ep4", "ep2_dp4"])


@pytest.mark.parametrize("name", ["softmax_ep4", "sigmoid_groups_ep4"])
def test_ep4_layer_equals_one_process(four_ranks, name):
    check_layer(four_ranks, name)
    for res in four_ranks:
        check_saved_bytes(res[name])


def test_ep2_times_two_data_parallel_groups_equals_one_process(four_ranks):
    """4 ranks, ep=2: two EP groups, each expert's gradient summed over the dp_mod_ep pair."""
    check_layer(four_ranks, "ep2_dp4")


# ----------------------------------------------------------------- no processes needed

@pytest.mark.parametrize("layout,world,experts,message", [
    (dict(dp_shard=3), 4, 8, "world size 4 is not dp_replicate 1 x dp_shard 3"),
    (dict(ep=4), 4, 6, "num_experts=6 is not divisible by --ep 4"),
    (dict(dp_shard=2, dp_replicate=2, ep=4), 4, 8, "--ep 4 does not divide dp_shard 2"),
    (dict(dp_replicate=3), 4, 8, "world size 4 is not divisible by --dp-replicate 3"),
    (dict(ep=0), 2, 8, "--ep must be >= 1, got 0"),
    (dict(dp_shard=0), 2, 8, "--dp-shard must be >= 1 or -1 (the rest), got 0"),
])
def test_bad_layouts_are_refused_with_the_numbers(layout, world, experts, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Layout(**layout).check(world, experts)


def test_layout_resolves_the_rest():
    assert Layout(dp_replicate=2, ep=2).check(8, 8) == Layout(dp_replicate=2, dp_shard=4, ep=2)
    assert Layout(dp_replicate=2, ep=2).check(8).dp_shard_mod_ep == 2


def test_one_process_has_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed() is None
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
