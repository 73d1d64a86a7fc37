"""A real client: lm-evaluation-harness's `local-completions` model scores a multiple-choice task (a local
task file, no downloads) against a live `moekit serve`; its per-choice log-likelihoods equal moekit's own
in-process ones on the same token ids. Slow tier: needs `pip install -e '.[eval]'` (lm-eval[api])."""

import argparse
import inspect
import json

import pytest
import torch

from moekit import ModelConfig, Transformer, save_model
from moekit.server import cli as serve_cli

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it (the [api] extra)


def test_lm_eval_multiple_choice_log_likelihoods_equal_moekit_in_process(tmp_path):
    from lm_eval.tasks import TaskManager

    from moekit.data import train_tokenizer
    from moekit.hf import save_hf

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=512)).eval()
    model.tokenizer = tok = train_tokenizer([inspect.getsource(argparse)], 512, progress=False)
    save_model(model, tmp_path / "ckpt")
    save_hf(model, tmp_path / "hf")  # lm-eval tokenizes with the exported (identical) HF tokenizer
    rows = [{"question": f"What follows {w}?", "choices": ["def", "return", "import", "class"], "answer": i % 4}
            for i, w in enumerate(["parser", "args", "the value", "if", "for x in", "  indented"])]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    args = serve_cli.build_parser().parse_args([str(tmp_path / "ckpt"), "--port", "0", "--quiet",
                                                "--model-name", "tiny", "--threads", str(torch.get_num_threads())])
    server = serve_cli.build_server(args)[0].start()
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={server.url}/v1/completions,tokenizer={tmp_path / 'hf'},"
                       "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
            tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True)
    finally:
        server.shutdown()
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == len(rows) and 0 <= out["results"]["tiny_mc"]["acc,none"] <= 1
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            whole = tok.encode(context + continuation).ids  # lm-eval's split of the pair
            n_ctx = len(tok.encode(context).ids)
            with torch.no_grad():
                logprobs_TV = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
            expected = sum(float(logprobs_TV[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))
            greedy = all(int(logprobs_TV[t - 1].argmax()) == whole[t] for t in range(n_ctx, len(whole)))
            (ll, is_greedy), = resp
            assert ll == pytest.approx(expected, abs=1e-4) and is_greedy == greedy
