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
