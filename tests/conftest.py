import json
import os

import pytest
import torch

# Without CUDA the Triton kernels run on the interpreter, which triton only honours when TRITON_INTERPRET
# is set before its first import: some transformers models (MiniMax-M2) import triton when they load.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """One .jsonl file of 120 small code-like documents (the training CLI tests' corpus)."""
    root = tmp_path_factory.mktemp("corpus")
    words = "def return self import for in if else value print ( ) : x y".split()
    rows = []
    for i in range(120):
        text = "\n".join(" ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(3 + (i + j) % 6))
                         for j in range(12))
        rows.append(json.dumps({"text": text}))
    (root / "one.jsonl").write_text("\n".join(rows) + "\n")
    return root / "one.jsonl"
