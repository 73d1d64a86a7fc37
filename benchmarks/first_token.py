"""Time to the first streamed token of `moekit generate` in a fresh process, against its floor and a peer.

    .venv/bin/python benchmarks/first_token.py                # tiny preset, 5 runs of each, 16 new tokens
    .venv/bin/python benchmarks/first_token.py --preset small --runs 3 --json

Every row is a fresh interpreter started by this script (the runs of the rows alternate):

    python -c "import torch"   the floor: no run that uses torch can start faster
    moekit generate            `moekit generate --checkpoint DIR --prompt-ids 1,2,3 --max-new-tokens N`
    HF transformers            AutoModelForCausalLM.from_pretrained on the same weights exported with
                               save_hf, then generate(max_new_tokens=N) with a streamer

"first token" = process start to the first token id written to stdout (import, load, prefill);
"total" = process start to exit. Medians over the runs, best run in brackets.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import git_commit
from machine import print_machine_header

PROMPT = [1, 2, 3]

HF_SCRIPT = """
import sys
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

class FirstIds(BaseStreamer):
    def __init__(self):
        self.prompt_seen = False
    def put(self, value):
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        sys.stdout.write(" ".join(map(str, value.reshape(-1).tolist())) + " ")
        sys.stdout.flush()
    def end(self):
        sys.stdout.write("\\n")

import torch
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
model.generate(torch.tensor([[PROMPT]]), max_new_tokens=int(sys.argv[2]), min_new_tokens=int(sys.argv[2]),
               do_sample=False, streamer=FirstIds(), pad_token_id=0)
"""


def time_process(cmd: list, env: dict = None) -> tuple:
    """(seconds to the first byte on stdout, seconds to exit, stdout) of one run of `cmd`."""
    start = time.perf_counter()
    # unbuffered: a buffered read(1) would keep bytes that communicate() then never sees
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env)
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start
    rest, err = proc.communicate()
    total_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{err.decode()[-2000:]}")
    return (first_s if first else None), total_s, (first + rest).decode()


def make_checkpoints(preset: str, root: Path) -> tuple:
    from moekit import ModelConfig, Transformer
    from moekit.checkpoint import save_model

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset)).eval()
    save_model(model, root / "moekit")
    hf_dir = None
    try:
        from moekit.hf import save_hf

        save_hf(model, root / "hf")
        hf_dir = root / "hf"
    except (ImportError, ValueError) as err:
        print(f"no HF row: {err}", file=sys.stderr)
    return model.num_params(), root / "moekit", hf_dir


def commands(ckpt: Path, hf_dir, new_tokens: int) -> dict:
    console = Path(sys.executable).parent / "moekit"
    moekit = [str(console)] if console.exists() else [sys.executable, "-m", "moekit.cli"]
    rows = {
        'python -c "import torch"': [sys.executable, "-c", "import torch; print(1)"],
        "moekit generate": moekit + ["generate", "--checkpoint", str(ckpt), "--prompt-ids",
                                     ",".join(map(str, PROMPT)), "--max-new-tokens", str(new_tokens)],
    }
    if hf_dir is not None:
        if importlib.util.find_spec("transformers") is None:
            print("no HF row: transformers is not installed", file=sys.stderr)
        else:
            script = HF_SCRIPT.replace("PROMPT", ",".join(map(str, PROMPT)))
            rows["HF transformers"] = [sys.executable, "-c", script, str(hf_dir), str(new_tokens)]
    return rows


def run(preset: str, runs: int, new_tokens: int, threads: int = None) -> dict:
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        n_params, ckpt, hf_dir = make_checkpoints(preset, Path(tmp))
        cmds = commands(ckpt, hf_dir, new_tokens)
        times = {name: [] for name in cmds}
        outputs = {}
        for _ in range(runs):
            for name, cmd in cmds.items():
                first_s, total_s, out = time_process(cmd, env)
                times[name].append((first_s, total_s))
                outputs[name] = out.split()
    rows = []
    for name, ts in times.items():
        firsts = [f for f, _ in ts if f is not None]
        totals = [t for _, t in ts]
        rows.append({"impl": name, "first_s": statistics.median(firsts), "first_best_s": min(firsts),
                     "total_s": statistics.median(totals), "total_best_s": min(totals), "runs": len(ts)})
    same = None
    if "HF transformers" in outputs:
        same = outputs["HF transformers"] == outputs["moekit generate"]
    return {"preset": preset, "params": n_params, "new_tokens": new_tokens, "commit": git_commit(), "threads": threads,
            "rows": rows, "greedy_ids_equal": same}


def format_table(result: dict) -> str:
    lines = ["implementation | first token s | total s | runs", "-------------- | ------------- | ------- | ----"]
    for r in result["rows"]:
        lines.append(f"{r['impl']} | {r['first_s']:.2f} ({r['first_best_s']:.2f}) | "
                     f"{r['total_s']:.2f} ({r['total_best_s']:.2f}) | {r['runs']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    print_machine_header(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every child (default: torch's choice, one per core)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.runs < 1 or args.new_tokens < 1 or (args.threads is not None and args.threads < 1):
        p.error("--runs, --new-tokens and --threads must be positive")
    result = run(args.preset, args.runs, args.new_tokens, args.threads)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"first token of a fresh process, commit {result['commit']}: preset {result['preset']} "
          f"({result['params']:,} parameters), prompt {PROMPT}, {result['new_tokens']} new tokens (greedy), "
          f"threads {result['threads'] or 'default'}")
    print("median over runs (best in brackets)\n")
    print(format_table(result))
    if result["greedy_ids_equal"] is not None:
        print(f"\ngreedy ids moekit == HF: {'yes' if result['greedy_ids_equal'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
