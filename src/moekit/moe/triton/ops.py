"""Layers 2 and 3 of the Triton ops: `torch.library` custom ops and checked wrappers.

Custom ops (namespace "moekit"), each with a `register_fake` giving output shapes,
dtypes and strides, so torch.compile(fullgraph=True) traces through them without
running a kernel; the real implementation allocates its outputs and launches the
kernel (layer 1). They are functional (no argument is mutated) and opaque to
the compiler, so the kernels' data-dependent scheduling stays inside them.

    moekit::moe_up_swiglu(x, w13, gates, tok, offsets)            -> (H, A')
    moekit::moe_grouped_mm(a, w, offsets, transpose)              -> C
    moekit::moe_swiglu_dh(dout, w2, h, gates, tok, offsets)       -> (dH, A', dS)
    moekit::moe_grouped_wgrad(a, b, tok, offsets, gather_a, gather_b) -> (E, M, N)
    moekit::moe_gather_sum(y, ptr, pos)                           -> (T, D)

The wrappers below (`up_proj_swiglu`, `grouped_mm`, `swiglu_dh`, `grouped_wgrad`,
`gather_sum`) check shapes, dtypes and devices and raise ValueError naming the
offending values; the autograd.Function calls those.

Legend: T tokens, D model dim, F expert dim, E experts, P pairs sorted by expert.
"""

from typing import Tuple

import torch
from torch import Tensor

from .aggregate import launch_gather_sum
from .common import INTERPRET, SUPPORTED_DTYPES
from .dh import launch_dh
from .gmm import launch_gmm
from .up_swiglu import launch_up_swiglu
from .wgrad import launch_wgrad

INDEX_DTYPE = torch.int32


# ---------------------------------------------------------------- custom ops (layer 2)


@torch.library.custom_op("moekit::moe_up_swiglu", mutates_args=())
def _up_swiglu(x_TD: Tensor, w13_EFD: Tensor, gates_P: Tensor, tok_P: Tensor, offsets_E1: Tensor) -> Tuple[Tensor, Tensor]:
    P, F = tok_P.shape[0], w13_EFD.shape[1] // 2
    h_P2F = x_TD.new_empty(P, 2 * F)
    a_PF = x_TD.new_empty(P, F)
    launch_up_swiglu(x_TD, w13_EFD, gates_P, tok_P, offsets_E1, h_P2F, a_PF)
    return h_P2F, a_PF


@_up_swiglu.register_fake
def _(x_TD, w13_EFD, gates_P, tok_P, offsets_E1):
    P, F = tok_P.shape[0], w13_EFD.shape[1] // 2
    return x_TD.new_empty(P, 2 * F), x_TD.new_empty(P, F)


def _weight_EKN(w: Tensor, transpose: bool) -> Tensor:
    return w.transpose(1, 2) if transpose else w


@torch.library.custom_op("moekit::moe_grouped_mm", mutates_args=())
def _grouped_mm(a_PK: Tensor, w: Tensor, offsets_E1: Tensor, transpose: bool) -> Tensor:
    b_EKN = _weight_EKN(w, transpose)
    c_PN = a_PK.new_empty(a_PK.shape[0], b_EKN.shape[2])
    launch_gmm(a_PK, b_EKN, offsets_E1, c_PN)
    return c_PN


@_grouped_mm.register_fake
def _(a_PK, w, offsets_E1, transpose):
    return a_PK.new_empty(a_PK.shape[0], w.shape[1] if transpose else w.shape[2])


@torch.library.custom_op("moekit::moe_swiglu_dh", mutates_args=())
def _swiglu_dh(dout_TD: Tensor, w2_EDF: Tensor, h_P2F: Tensor, gates_P: Tensor, tok_P: Tensor,
               offsets_E1: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    P, F = h_P2F.shape[0], h_P2F.shape[1] // 2
    dh_P2F = h_P2F.new_empty(P, 2 * F)
    a_PF = h_P2F.new_empty(P, F)
    ds_P = gates_P.new_empty(P)
    launch_dh(dout_TD, w2_EDF, h_P2F, gates_P, tok_P, offsets_E1, dh_P2F, a_PF, ds_P)
    return dh_P2F, a_PF, ds_P


@_swiglu_dh.register_fake
def _(dout_TD, w2_EDF, h_P2F, gates_P, tok_P, offsets_E1):
    P, F = h_P2F.shape[0], h_P2F.shape[1] // 2
    return h_P2F.new_empty(P, 2 * F), h_P2F.new_empty(P, F), gates_P.new_empty(P)


@torch.library.custom_op("moekit::moe_grouped_wgrad", mutates_args=())
def _grouped_wgrad(a_RM: Tensor, b_RN: Tensor, tok_P: Tensor, offsets_E1: Tensor, gather_a: bool, gather_b: bool) -> Tensor:
    c_EMN = a_RM.new_empty(offsets_E1.shape[0] - 1, a_RM.shape[1], b_RN.shape[1])
    launch_wgrad(a_RM, b_RN, tok_P, offsets_E1, c_EMN, gather_a, gather_b)
    return c_EMN


@_grouped_wgrad.register_fake
def _(a_RM, b_RN, tok_P, offsets_E1, gather_a, gather_b):
    return a_RM.new_empty(offsets_E1.shape[0] - 1, a_RM.shape[1], b_RN.shape[1])


@torch.library.custom_op("moekit::moe_gather_sum", mutates_args=())
def _gather_sum(y_PD: Tensor, ptr_T1: Tensor, pos_P: Tensor) -> Tensor:
    out_TD = y_PD.new_empty(ptr_T1.shape[0] - 1, y_PD.shape[1])
    launch_gather_sum(y_PD, ptr_T1, pos_P, out_TD)
    return out_TD


@_gather_sum.register_fake
def _(y_PD, ptr_T1, pos_P):
    return y_PD.new_empty(ptr_T1.shape[0] - 1, y_PD.shape[1])


# ---------------------------------------------------------------- checks


def _fail(msg: str):
    raise ValueError(msg)


def check_device(**tensors: Tensor) -> None:
    """All on one device: CUDA, or the CPU when the kernels run under TRITON_INTERPRET=1."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        _fail(f"Triton MoE kernels need all tensors on one device, got {', '.join(f'{n}: {d}' for n, d in devices.items())}")
    if first.type == "cuda" or first.type == "meta":
        return
    if first.type == "cpu":
        if INTERPRET:
            return
        _fail(
            "experts_impl='triton' got CPU tensors, but Triton kernels run on a CUDA GPU; "
            "use a CUDA device, or run the kernels on the CPU interpreter by setting TRITON_INTERPRET=1 "
            "before moekit's triton kernels are first imported (slow: for tests and tiny shapes), "
            "or use experts_impl='grouped' on CPU"
        )
    _fail(f"experts_impl='triton' supports CUDA devices (or the CPU under TRITON_INTERPRET=1), got device {first}")


def check_float(name: str, t: Tensor, dtype: torch.dtype = None) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        _fail(f"{name} has dtype {t.dtype}; the Triton MoE kernels support {[str(d) for d in SUPPORTED_DTYPES]}")
    if dtype is not None and t.dtype != dtype:
        _fail(f"{name} has dtype {t.dtype} but the activations are {dtype}; cast them to one dtype")


def check_shape(name: str, t: Tensor, shape) -> None:
    """shape: ints or None (any size)."""
    if t.dim() != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        _fail(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_index(name: str, t: Tensor, length=None) -> None:
    if t.dtype != INDEX_DTYPE:
        _fail(f"{name} must be {INDEX_DTYPE} (routing metadata from routing.routing_metadata), got {t.dtype}")
    check_shape(name, t, (length,))


# ---------------------------------------------------------------- checked wrappers (layer 3)


def up_proj_swiglu(x_TD: Tensor, w13_EFD: Tensor, gates_P: Tensor, tok_P: Tensor, offsets_E1: Tensor) -> Tuple[Tensor, Tensor]:
    """H = X[tok] @ W13[e].T (P, 2F) and A' = gates * silu(G) * U (P, F), rows sorted by expert."""
    check_device(x=x_TD, w13=w13_EFD, gates=gates_P, tok=tok_P, offsets=offsets_E1)
    check_float("x", x_TD)
    check_float("w13", w13_EFD, x_TD.dtype)
    check_shape("x", x_TD, (None, None))
    check_shape("w13", w13_EFD, (None, None, x_TD.shape[1]))
    E, F2, _ = w13_EFD.shape
    if F2 % 2:
        _fail(f"w13 must have an even number of rows (gate and up halves), got {F2}")
    check_index("tok", tok_P)
    check_shape("gates", gates_P, (tok_P.shape[0],))
    check_float("gates", gates_P)
    check_index("offsets", offsets_E1, E + 1)
    return _up_swiglu(x_TD, w13_EFD, gates_P, tok_P, offsets_E1)


def grouped_mm(a_PK: Tensor, w: Tensor, offsets_E1: Tensor, transpose: bool) -> Tensor:
    """C[rows of e] = A[rows of e] @ (w[e].T if transpose else w[e])."""
    check_device(a=a_PK, w=w, offsets=offsets_E1)
    check_float("a", a_PK)
    check_float("w", w, a_PK.dtype)
    check_shape("a", a_PK, (None, None))
    check_shape("w", w, (None, None, a_PK.shape[1]) if transpose else (None, a_PK.shape[1], None))
    check_index("offsets", offsets_E1, w.shape[0] + 1)
    return _grouped_mm(a_PK, w, offsets_E1, bool(transpose))


def swiglu_dh(dout_TD: Tensor, w2_EDF: Tensor, h_P2F: Tensor, gates_P: Tensor, tok_P: Tensor,
              offsets_E1: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """dH (P, 2F), A' = gates * A (P, F) and dS = <dO[tok] @ W2[e], A> (P,), rows sorted by expert."""
    check_device(dout=dout_TD, w2=w2_EDF, h=h_P2F, gates=gates_P, tok=tok_P, offsets=offsets_E1)
    check_float("dout", dout_TD)
    check_float("w2", w2_EDF, dout_TD.dtype)
    check_float("h", h_P2F, dout_TD.dtype)
    check_float("gates", gates_P)
    check_shape("dout", dout_TD, (None, None))
    check_shape("w2", w2_EDF, (None, dout_TD.shape[1], None))
    check_shape("h", h_P2F, (None, 2 * w2_EDF.shape[2]))
    check_index("tok", tok_P, h_P2F.shape[0])
    check_shape("gates", gates_P, (h_P2F.shape[0],))
    check_index("offsets", offsets_E1, w2_EDF.shape[0] + 1)
    return _swiglu_dh(dout_TD, w2_EDF, h_P2F, gates_P, tok_P, offsets_E1)


def grouped_wgrad(a_RM: Tensor, b_RN: Tensor, tok_P: Tensor, offsets_E1: Tensor,
                  gather_a: bool = False, gather_b: bool = False) -> Tensor:
    """out[e] = a[rows of e].T @ b[rows of e] (E, M, N); a/b rows read through tok when gathered."""
    check_device(a=a_RM, b=b_RN, tok=tok_P, offsets=offsets_E1)
    check_float("a", a_RM)
    check_float("b", b_RN, a_RM.dtype)
    check_shape("a", a_RM, (None, None))
    check_shape("b", b_RN, (None, None))
    check_index("tok", tok_P)
    check_index("offsets", offsets_E1)
    P = tok_P.shape[0]
    if not gather_a and a_RM.shape[0] != P:
        _fail(f"a has {a_RM.shape[0]} rows but there are {P} pairs (pass gather_a=True to read rows by token)")
    if not gather_b and b_RN.shape[0] != P:
        _fail(f"b has {b_RN.shape[0]} rows but there are {P} pairs (pass gather_b=True to read rows by token)")
    return _grouped_wgrad(a_RM, b_RN, tok_P, offsets_E1, bool(gather_a), bool(gather_b))


def gather_sum(y_PD: Tensor, ptr_T1: Tensor, pos_P: Tensor) -> Tensor:
    """out[t] = sum of y[pos[ptr[t]:ptr[t+1]]] (T, D), accumulated in float32."""
    check_device(y=y_PD, ptr=ptr_T1, pos=pos_P)
    check_float("y", y_PD)
    check_shape("y", y_PD, (None, None))
    check_index("ptr", ptr_T1)
    check_index("pos", pos_P, y_PD.shape[0])
    if ptr_T1.shape[0] < 1:
        _fail("ptr must have T + 1 entries (at least 1)")
    return _gather_sum(y_PD, ptr_T1, pos_P)
