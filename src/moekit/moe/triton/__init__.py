"""Triton kernels for the routed experts (`experts_impl="triton"`).

Importing this package imports `triton`; moekit itself imports it lazily, only when
the triton backend is asked for (experts.get_backend). Kernels run on CUDA GPUs, or
on the CPU under TRITON_INTERPRET=1 (set before this package is first imported).

Files, one concern each:
    common.py     interpreter flag, dtypes, in-kernel tile schedule, dot helper
    configs.py    autotune configs (GPU bf16; one small config under the interpreter)
    routing.py    integer routing metadata (sort by expert, offsets, token CSR)
    up_swiglu.py  forward: gathered X @ W13 with the SwiGLU epilogue -> H, A' = S*A
    gmm.py        varlen-M grouped GEMM: down projection Y' = A' @ W2.T, backward dXg = dH @ W13
    aggregate.py  gather-and-sum of each token's pair rows (output, dX)
    dh.py         backward: dO gathered @ W2, epilogue dH, A' and dS = <dA', A>
    wgrad.py      varlen-K grouped GEMM: dW2, dW13 (operands gathered by token inside)
    ops.py        torch.library custom ops (+ register_fake) and checked wrappers
    function.py   autograd.Function and `experts_triton`
"""

from .function import TritonExpertsFunction, experts_triton

__all__ = ["TritonExpertsFunction", "experts_triton"]
