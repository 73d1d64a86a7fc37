"""Speed of the first step: building a model to load it into (on meta) does no initialisation work.

`normal_` and `arange` on meta run torch's Python reference kernels, whose first call imports
torch._dynamo (about 1 s of a 2-3 s `moekit generate`); a model built on meta must not touch them.
"""

import json
import subprocess
import sys

import torch

from moekit.config import ModelConfig
from moekit.model import Transformer
from moekit.rope import rope_inv_freq


def test_a_model_built_on_meta_does_not_import_dynamo():
    script = (
        "import sys, torch\n"
        "from moekit.config import ModelConfig\n"
        "from moekit.model import Transformer\n"
        "with torch.device('meta'):\n"
        "    model = Transformer(ModelConfig.preset('tiny'))\n"
        "print(all(t.is_meta for t in list(model.parameters()) + list(model.buffers())), 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_generate_from_a_checkpoint_does_not_import_dynamo(tmp_path):
    from moekit.checkpoint import save_model

    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).eval()
    save_model(model, tmp_path / "ckpt")
    expected = model(torch.tensor([[1, 2, 3]]))[0, -1].argmax().item()
    script = (
        "import json, sys\n"
        "from moekit import load_model\n"
        "from moekit.generate import generate\n"
        f"tokens = generate(load_model({str(tmp_path / 'ckpt')!r}), [[1, 2, 3]], max_new_tokens=1)\n"
        "print(json.dumps([tokens[0], 'torch._dynamo' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[expected], False]


def test_a_model_built_on_cpu_is_still_initialised():
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg)
    assert model.inv_freq.device.type == "cpu"
    assert torch.equal(model.inv_freq, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        if p.dim() >= 2:  # weights are N(0, std^2): the sample std lies close to it
            assert abs(p.std().item() - cfg.init_std) < 0.15 * cfg.init_std, name
        else:  # norms
            assert torch.all(p == 1), name
