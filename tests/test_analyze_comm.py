"""The analyzer's communication model (analyze/comm.py) against numbers worked by hand on a tiny MoE layer,
the interconnect it picks (NVLink inside a node, InfiniBand across), the EP table, and the CLI's errors."""

import json
import subprocess
import sys

import pytest

from moekit.analyze import analyze, from_layer
from moekit.analyze.comm import a2a_bytes_per_token, a2a_count_bytes, a2a_seconds, fsdp_bytes_per_step, nodes_spanned
from moekit.analyze.hardware import CATALOG

# bare layer d 64, n 32, E 8, K 2: router 8·64 = 512 params (dense), experts 8·(2·32·64 + 64·32) = 49,152
LAYER = from_layer(64, 32, 8, 2)
DENSE_BYTES, EXPERT_BYTES = 512 * 2, 49_152 * 2  # bf16
H100 = CATALOG["h100"]


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "moekit.cli", "analyze", *argv], capture_output=True, text=True)


def test_all_to_all_bytes_by_hand():
    # ep 2: half of the K = 2 pairs leave; a row is 64 values x 2 bytes = 128 B, its gate 4 B (float32)
    a = a2a_bytes_per_token(64, 2, 2, 2)
    assert a["dispatch"] == 2 * (128 + 4) / 2 == 132
    assert a["combine"] == 2 * 128 / 2 == 128
    assert a["backward"] == 2 * (2 * 128 + 4) / 2 == 260  # the rows' and the gates' gradients
    assert a["training"] == 132 + 128 + 260 == 520
    # ep 4 in fp32: 3/4 leave; ep 1: nothing
    assert a2a_bytes_per_token(64, 2, 4, 4)["forward"] == 2 * (256 + 4) * 3 / 4 + 2 * 256 * 3 / 4 == 774
    assert a2a_bytes_per_token(64, 2, 1, 2)["training"] == 0
    # the counts before each dispatch: E/ep int64 to each other rank
    assert a2a_count_bytes(8, 2) == 4 * 8 and a2a_count_bytes(8, 4) == 3 * 2 * 8


def test_fsdp_bytes_by_hand():
    # dp 4, ep 2: dense over 4 ranks (3/4 arrive), each rank's 4 experts over dp/ep = 2 ranks (1/2 arrives)
    f = fsdp_bytes_per_step(DENSE_BYTES, EXPERT_BYTES, 4, 2)
    assert f["dense"] == 1024 * 3 / 4 == 768
    assert f["experts"] == 98_304 / 2 / 2 == 24_576
    assert f["all_gather_forward"] == f["all_gather_backward"] == f["reduce_scatter"] == 25_344
    assert f["total"] == 3 * 25_344
    # no EP: all experts over all 4 ranks
    assert fsdp_bytes_per_step(DENSE_BYTES, EXPERT_BYTES, 4, 1)["experts"] == 98_304 * 3 / 4
    assert fsdp_bytes_per_step(DENSE_BYTES, EXPERT_BYTES, 1, 1)["total"] == 0
    # the root's own weights (embeddings, final norm, head) stay gathered from forward to backward
    r = fsdp_bytes_per_step(1000, 0, 2, 1, root_bytes=200)
    assert (r["all_gather_forward"], r["all_gather_backward"], r["reduce_scatter"], r["total"]) == (500, 400, 500, 1400)


def test_links_inside_and_across_nodes():
    assert nodes_spanned(4, 1, 8) == 1 and nodes_spanned(4, 1, 2) == 2 and nodes_spanned(2, 2, 2) == 2
    # 12 peers over 16 ranks in nodes of 8: 7 peers over NVLink, 8 over InfiniBand (50 GB/s per GPU), 1 B each
    assert a2a_seconds(15, 16, 8, H100) == pytest.approx(max(7 / 450e9, 8 / 50e9))
    assert a2a_seconds(7, 8, 8, H100) == pytest.approx(7 / 450e9)


@pytest.mark.parametrize("nodes, a2a_bw, dense_bw, expert_bw", [
    (1, 450e9, 450e9, 450e9),  # 4 GPUs in one node: everything on NVLink
    (2, 450e9, 200e9, 200e9),  # 2 per node: the EP pair {0, 1} shares a node, the FSDP groups do not
    (4, 400e9, 400e9, 400e9),  # 1 per node: the whole node's InfiniBand for each GPU
])
def test_report_section_by_hand(nodes, a2a_bw, dense_bw, expert_bw):
    r = analyze(LAYER, hardware="h100", weights="bf16", tokens=100, dp=4, ep=2, nodes=nodes)
    c = r["communication"]
    assert (c["dp"], c["ep"], c["nodes"], c["tokens_per_rank"], c["experts_per_rank"]) == (4, 2, nodes, 100, 4)
    assert c["a2a_bytes_per_token_per_layer"]["training"] == 520  # 132 + 128 + 260
    assert c["a2a_bytes_per_step"] == 520 * 100 + 32  # x 100 tokens x 1 MoE layer, + the counts
    assert c["fsdp_bytes_per_step"]["total"] == 3 * 25_344
    assert c["a2a_s"] == pytest.approx(52_032 / a2a_bw)
    assert c["fsdp_s"] == pytest.approx(3 * 768 / dense_bw + 3 * 24_576 / expert_bw)
    compute = 100 * 3 * 6 * 64 * 32 * 2 / 989e12 + 100 * 3 * 2 * 512 / 989e12  # experts 6dnK + router 2dE, x3
    assert c["compute_s"] == pytest.approx(compute)
    assert c["step_s"] == pytest.approx(max(compute, c["fsdp_s"]) + c["a2a_s"])
    assert c["step_serial_s"] == pytest.approx(compute + c["fsdp_s"] + c["a2a_s"])
    assert c["tokens_per_s"] == pytest.approx(400 / c["step_s"])


def test_ep_table_and_when_it_pays():
    c = analyze(LAYER, hardware="h100", tokens=100, dp=8, nodes=1)["communication"]
    assert [e["ep"] for e in c["by_ep"]] == [1, 2, 4, 8] and c["ep"] == 1
    assert c["by_ep"][0]["a2a_bytes_per_step"] == 0
    # EP trades gathered expert bytes for all-to-all bytes: FSDP falls with ep, the all-to-all grows
    fsdp = [e["fsdp_bytes_per_step"]["total"] for e in c["by_ep"]]
    a2a = [e["a2a_bytes_per_step"] for e in c["by_ep"]]
    assert fsdp == sorted(fsdp, reverse=True) and a2a == sorted(a2a)
    assert c["best_ep"] == min(c["by_ep"], key=lambda e: e["step_s"])["ep"]
    # a big model with few tokens per GPU: the expert all-gathers dominate and EP pays
    big = analyze(from_layer(4096, 1024, 64, 4), hardware="h100", tokens=512, dp=8)["communication"]
    assert big["best_ep"] > 1
    # a tiny layer with many tokens: nothing to gather, the all-to-all costs: no EP
    small = analyze(from_layer(64, 32, 8, 2), hardware="h100", tokens=65536, dp=8)["communication"]
    assert small["best_ep"] == 1


def test_no_section_without_flags_and_dp_defaults():
    assert analyze(LAYER, tokens=100)["communication"] is None
    assert analyze(LAYER, tokens=100, ep=2)["communication"]["dp"] == 2
    assert analyze(LAYER, tokens=100, nodes=2)["communication"]["dp"] == 16


def test_cli_prints_the_section_and_json():
    out = run_cli("--layer", "64,32,8,2", "--tokens", "100", "--dp", "4", "--ep", "2")
    assert out.returncode == 0, out.stderr
    assert "Training communication: dp 4 GPUs on 1 node(s)" in out.stdout
    assert "When expert parallelism pays off" in out.stdout
    js = run_cli("--layer", "64,32,8,2", "--tokens", "100", "--dp", "4", "--ep", "2", "--json")
    assert json.loads(js.stdout)["communication"]["a2a_bytes_per_step"] == 52_032


@pytest.mark.parametrize("argv, message", [
    (["--ep", "3", "--dp", "6"], "num_experts=8 is not divisible by --ep 3"),
    (["--ep", "4", "--dp", "6"], "--ep 4 does not divide --dp 6"),
    (["--dp", "4", "--nodes", "3"], "--nodes 3 must be a positive integer that divides --dp 4"),
    (["--dp", "16", "--nodes", "1"], "a h100 node holds 8"),
    (["--dp", "0"], "--dp must be a positive integer"),
    (["--dp", "2", "--hardware", "m1"], "no interconnect figures for --hardware m1"),
    (["--dp", "16", "--hardware", "rtx4090"], "no InfiniBand figure for --hardware rtx4090"),
])
def test_bad_layouts(argv, message):
    out = run_cli("--layer", "64,32,8,2", *argv)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_ep_needs_moe():
    dense = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    from moekit.analyze import from_hf_config

    with pytest.raises(ValueError, match="--ep 2 needs an MoE model"):
        analyze(from_hf_config(dense), dp=2, ep=2)
    c = analyze(from_hf_config(dense), dp=2, context=10)["communication"]
    assert c["a2a_bytes_per_step"] == 0 and c["by_ep"][0]["ep"] == 1


# ----------------------------------------------------------------------------- measured on 2 gloo processes
WORKER = r'''
import json, sys, torch, torch.distributed as dist
from pathlib import Path
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
from distributed import CollectiveBytes  # benchmarks/distributed.py
from torch.distributed.device_mesh import init_device_mesh
from moekit import ModelConfig, Transformer
from moekit.dist.ep import apply_expert_parallel
from moekit.dist.fsdp import parallelize
from moekit.dist.mesh import Layout, build_meshes, finish_and_exit, init_distributed
from moekit.moe import MoE, MoEConfig

env = init_distributed()
rank = env.rank
# 1. one MoE layer, EP 2: every token picks expert 0 (rank 0) and expert 2 (rank 1), so exactly half of
#    each rank's pairs leave it, as the uniform-routing formula assumes
torch.manual_seed(0)
moe = MoE(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2))
with torch.no_grad():
    u = torch.ones(16)
    moe.router.weight.copy_(torch.stack([2 * u, -u, u, -u]))
ep_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
apply_expert_parallel(moe, ep_mesh)
moe.train()
x_TD = (torch.rand(6, 16, generator=torch.Generator().manual_seed(rank)) + 0.1).requires_grad_()
layer = CollectiveBytes([ep_mesh.get_group()])
with layer:
    y_TD, _ = moe(x_TD)
    y_TD.sum().backward()
# 2. the tiny model under FSDP x EP (2 ranks, ep 2): one forward + backward
torch.manual_seed(0)
cfg = ModelConfig.preset("tiny", dtype="float32")
model = Transformer(cfg)
layout = Layout(ep=2).check(2, cfg.moe.num_experts)
meshes = build_meshes(env, layout)
parallelize(model, meshes, layout)
tokens_BT = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(rank))
full = CollectiveBytes([meshes.ep.get_group(), meshes.dp.get_group(), meshes.dp_mod_ep.get_group()])
with full:
    logits_BTV = model(tokens_BT[:, :-1])
    F.cross_entropy(logits_BTV.view(-1, cfg.vocab_size), tokens_BT[:, 1:].reshape(-1)).backward()
result = {"rank": rank, "layer": dict(layer.bytes), "model": dict(full.bytes)}
(Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(result))  # (not stdout: the ranks' lines interleave)
finish_and_exit(0)
'''


def test_collectives_move_the_predicted_bytes(tmp_path):
    """2 gloo processes: the all-to-all bytes of an EP=2 MoE layer's forward + backward equal the formula
    exactly under uniform routing; FSDP x EP on the tiny model moves the all-gather / reduce-scatter bytes
    step_bytes predicts."""
    import os
    from pathlib import Path

    from moekit import ModelConfig
    from moekit.analyze import from_model_config
    from moekit.analyze.comm import step_bytes

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(bench), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    # by hand, d 16, K 2, fp32 rows of 64 B, float32 gates, 6 tokens per rank, half of the pairs leave:
    # dispatch 2·(64 + 4)/2 + combine 2·64/2 + backward 2·(2·64 + 4)/2 = 264 B per token; counts 4·8/2 = 16 B
    per_layer = 264 * 6 + 16
    assert step_bytes(from_layer(16, 8, 4, 2), 2, 2, 6, 4, 4)["a2a_step"] == per_layer
    tiny = from_model_config(ModelConfig.preset("tiny", dtype="float32"))
    fsdp = step_bytes(tiny, 2, 2, 16, 4, 4)["fsdp"]
    for r in results:
        assert r["layer"] == {"all_to_all": per_layer}
        assert r["model"]["all_gather"] == fsdp["all_gather_forward"] + fsdp["all_gather_backward"]
        assert r["model"]["reduce_scatter"] == fsdp["reduce_scatter"]
