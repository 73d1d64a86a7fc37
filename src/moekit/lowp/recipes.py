"""Low-precision training recipes: how each operand of each GEMM of a linear layer is quantised.

A layer y = x Wᵀ runs three GEMMs, each quantised along its own reduction dim (the operands' last dim
below; the product is a_q b_qᵀ):

    role    a (rows, reduction)      b (rows, reduction)    result
    fwd     x        (M, K)          W      (N, K)          y  (M, N)
    dgrad   dy       (M, N)          Wᵀ     (K, N)          dx (M, K)
    wgrad   dyᵀ      (N, M)          xᵀ     (K, M)          dW (N, K)

Recipes (a spec is NAME or NAME:opt=value,opt=value):

    fp8-tensorwise  E4M3 x and W, E5M2 gradients; one float scale per tensor (per expert for experts)
    fp8-rowwise     E4M3 everywhere; one float scale per row along the reduction dim
    fp8-blockwise   DeepSeek-V3: E4M3, activations and gradients per 1x128 tile along the reduction dim,
                    weights per 128x128 block; float scales (amax / 448)
    mxfp8           OCP MXFP8 (E4M3, E8M0 scale per 32) in all three GEMMs
    mxfp4-bwd       Tseng et al.: forward in high precision; dgrad and wgrad in OCP MXFP4 (E2M1, scale
                    per 32). Options sr=1 (stochastic rounding, values x3/4 before and x4/3 after so the
                    block max cannot clip at 6), rht=1 (random Hadamard transform of both operands),
                    rht_block=64

Every recipe takes keep=PART+PART: the parts left in high precision (default head; parts: attention,
ffn, experts, head). Embeddings, norms and the router are never quantised.

Two executions of the same recipe, gemm=auto|emulate|scaled_mm (`Recipe.product`):
    emulate     quantise, dequantise to float32, multiply in float32 (any device, any recipe)
    scaled_mm   the FP8 codes and scales into torch's scaled matmul (scaled.py): fp8-tensorwise and
                fp8-rowwise on CPU and CUDA, fp8-blockwise on CUDA sm90; a GEMM torch cannot run so
                falls back to emulate, the reason in `Recipe.fallbacks` (and a warning when asked for)
    auto        scaled_mm on CUDA, emulate elsewhere (default)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Tuple

import torch

from .formats import check_rounding, fp8_fake_quant
from .hadamard import random_signs, rht
from .mx import mx_fake_quant
from .scaled import fp8_quantize, fp8_scaled_mm, unsupported

ROLES = ("fwd", "dgrad", "wgrad")
PARTS = ("attention", "ffn", "experts", "head")  # ffn: dense FFNs and shared experts
DEFAULT_KEEP = ("head",)
MX_BLOCK = 32
EXECUTIONS = ("auto", "emulate", "scaled_mm")  # gemm=
SR_PRESCALE = 0.75  # MX stochastic rounding: x * 3/4 before, / (3/4) after (the block max stays below the top)


@dataclass(frozen=True)
class Operand:
    """How one GEMM operand is quantised along its last dim: kind none | fp8 | mx."""
    kind: str = "none"
    elem: str = "e4m3"
    scaling: str = "tile"  # fp8: tensor, row, tile (1x128), block (128x128)
    rounding: str = "nearest"

    def quantize(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        if self.kind == "none":
            return x.float()
        if self.kind == "fp8":
            return fp8_fake_quant(x, self.elem, self.scaling, self.rounding, generator)
        if self.rounding == "stochastic":
            return mx_fake_quant(x, self.elem, MX_BLOCK, "stochastic", generator, prescale=SR_PRESCALE)
        return mx_fake_quant(x, self.elem, MX_BLOCK, self.rounding, generator)

    def bits(self) -> float:
        """Stored bits per value (scales included) of this operand; 32 for high precision (the emulation's)."""
        if self.kind == "none":
            return 32.0
        elem_bits = 4 if self.elem == "e2m1" else 8
        return elem_bits + (8 / MX_BLOCK if self.kind == "mx" else 0.0)


@dataclass(frozen=True)
class Gemm:
    a: Operand = Operand()
    b: Operand = Operand()
    rht: bool = False

    @property
    def quantized(self) -> bool:
        return self.a.kind != "none" or self.b.kind != "none"


@dataclass(frozen=True)
class Recipe:
    name: str
    fwd: Gemm
    dgrad: Gemm
    wgrad: Gemm
    rht_block: int = 64
    keep: Tuple[str, ...] = DEFAULT_KEEP
    spec: str = ""  # how it was asked for (config.json keeps this string)
    options: Dict[str, int] = field(default_factory=dict)
    execution: str = "auto"  # gemm= (EXECUTIONS)
    fallbacks: Dict[str, str] = field(default_factory=dict, compare=False)  # role -> why it was emulated

    def gemm(self, role: str) -> Gemm:
        if role not in ROLES:
            raise ValueError(f"unknown GEMM role {role!r}; one of {ROLES}")
        return getattr(self, role)

    def operands(self, role: str, a: torch.Tensor, b: torch.Tensor, generator=None):
        """(a_q, b_q) in float32, both quantised along their last (reduction) dim as `role` says; with the
        Hadamard transform both are first rotated by the same fresh random signs (and padded to whole
        blocks). a_q @ b_qᵀ is the GEMM's result."""
        g = self.gemm(role)
        if g.rht:
            signs = random_signs(self.rht_block, generator, a.device)
            a, b = rht(a, signs, self.rht_block), rht(b, signs, self.rht_block)
        return g.a.quantize(a, generator), g.b.quantize(b, generator)

    def runs_as(self, role: str, device: torch.device) -> str:
        """'scaled_mm' or 'emulate': how GEMM `role` runs on `device` (a fallback's reason is recorded)."""
        want = self.execution if self.execution != "auto" else ("scaled_mm" if device.type == "cuda" else "emulate")
        if want == "emulate":
            return want
        g = self.gemm(role)
        why = unsupported(g.a, g.b, g.rht, device)
        if why is None:
            return want
        if role not in self.fallbacks and g.quantized:
            self.fallbacks[role] = why
            if self.execution == "scaled_mm":
                warnings.warn(f"precision {self.spec!r}: {role} GEMM emulated: {why}", stacklevel=2)
        return "emulate"

    def product(self, role: str, a: torch.Tensor, b: torch.Tensor, out_dtype=None, generator=None) -> torch.Tensor:
        """a_q @ b_qᵀ of GEMM `role` (a: (M, K), b: (N, K), 2-D) in out_dtype (default a's), run as
        runs_as says: the same quantised numbers either way, up to fp32 accumulation order."""
        out_dtype = out_dtype or a.dtype
        if self.runs_as(role, a.device) == "scaled_mm":
            g = self.gemm(role)
            qa = fp8_quantize(a, g.a.elem, g.a.scaling, g.a.rounding, generator)
            qb = fp8_quantize(b, g.b.elem, g.b.scaling, g.b.rounding, generator)
            return fp8_scaled_mm(qa, qb, (g.a.scaling, g.b.scaling), b.shape[0], out_dtype)
        a_q, b_q = self.operands(role, a, b, generator)
        return (a_q @ b_q.T).to(out_dtype)

    def grouped_product(self, role: str, a_RK: torch.Tensor, b_ENK: torch.Tensor, groups, out_dtype=None):
        """The expert GEMM of `role` as scaled matmuls (runs_as(...) == 'scaled_mm'): out[start:end] =
        a_q[start:end] @ b_q[e]ᵀ for each (e, start, end) in groups, a quantised once over all its rows
        and b per expert, as `operands` quantises them; rows in no group are 0."""
        g = self.gemm(role)
        codes_RK, s_a = fp8_quantize(a_RK, g.a.elem, g.a.scaling, g.a.rounding)
        out_RN = a_RK.new_zeros(a_RK.shape[0], b_ENK.shape[1], dtype=out_dtype or a_RK.dtype)
        for e, start, end in groups:
            qa = codes_RK[start:end], s_a if g.a.scaling == "tensor" else s_a[start:end]
            qb = fp8_quantize(b_ENK[e], g.b.elem, g.b.scaling, g.b.rounding)
            out_RN[start:end] = fp8_scaled_mm(qa, qb, (g.a.scaling, g.b.scaling), b_ENK.shape[1], out_RN.dtype)
        return out_RN


def fp8_recipe(act: str, weight: str, grad_elem: str) -> Callable[[dict], dict]:
    def build(opts: dict) -> dict:
        x, w, dy = Operand("fp8", "e4m3", act), Operand("fp8", "e4m3", weight), Operand("fp8", grad_elem, act)
        return dict(fwd=Gemm(x, w), dgrad=Gemm(dy, w), wgrad=Gemm(dy, x))
    return build


def mxfp8(opts: dict) -> dict:
    op = Operand("mx", "e4m3")
    return dict(fwd=Gemm(op, op), dgrad=Gemm(op, op), wgrad=Gemm(op, op))


def mxfp4_bwd(opts: dict) -> dict:
    op = Operand("mx", "e2m1", rounding="stochastic" if opts["sr"] else "nearest")
    bwd = Gemm(op, op, rht=bool(opts["rht"]))
    return dict(fwd=Gemm(), dgrad=bwd, wgrad=bwd, rht_block=opts["rht_block"])


# name -> (builder, its options with defaults)
RECIPES: Dict[str, Tuple[Callable[[dict], dict], Dict[str, int]]] = {
    "fp8-tensorwise": (fp8_recipe("tensor", "tensor", "e5m2"), {}),
    "fp8-rowwise": (fp8_recipe("row", "row", "e4m3"), {}),
    "fp8-blockwise": (fp8_recipe("tile", "block", "e4m3"), {}),
    "mxfp8": (mxfp8, {}),
    "mxfp4-bwd": (mxfp4_bwd, {"sr": 1, "rht": 1, "rht_block": 64}),
}
PRECISIONS = ("none",) + tuple(RECIPES)


def parse_keep(text: str) -> Tuple[str, ...]:
    parts = tuple(p for p in text.split("+") if p)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"keep={text}: unknown part {bad[0]!r}; parts: {', '.join(PARTS)} (joined with +)")
    return parts


def get_recipe(spec: str) -> Optional[Recipe]:
    """The recipe a spec names (module doc), or None for 'none' (every GEMM in the training dtype)."""
    name, _, rest = str(spec).partition(":")
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "none":
        if rest:
            raise ValueError(f"precision 'none' takes no options, got {spec!r}")
        return None
    build, defaults = RECIPES[name]
    opts, keep, execution = dict(defaults), DEFAULT_KEEP, "auto"
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key == "keep" and eq:
            keep = parse_keep(value)
            continue
        if key == "gemm" and eq:
            if value not in EXECUTIONS:
                raise ValueError(f"precision {spec!r}: gemm must be one of {', '.join(EXECUTIONS)}, got {value!r}")
            execution = value
            continue
        if key not in defaults or not eq:
            valid = ", ".join([f"{k}={v}" for k, v in defaults.items()] + ["keep=head", "gemm=auto"])
            raise ValueError(f"precision {spec!r}: unknown option {item!r}; {name} takes {valid}")
        try:
            opts[key] = int(value)
        except ValueError:
            raise ValueError(f"precision {spec!r}: {key} must be an integer, got {value!r}") from None
    if name == "mxfp4-bwd":
        for key in ("sr", "rht"):
            if opts[key] not in (0, 1):
                raise ValueError(f"precision {spec!r}: {key} must be 0 or 1, got {opts[key]}")
        b = opts["rht_block"]
        if b < MX_BLOCK or b & (b - 1):
            raise ValueError(f"precision {spec!r}: rht_block must be a power of two >= {MX_BLOCK}, got {b}")
    fields = build(opts)
    recipe = Recipe(name=name, keep=keep, spec=str(spec), options=opts, execution=execution, **fields)
    gemms = (recipe.fwd, recipe.dgrad, recipe.wgrad)
    for g in gemms:
        check_rounding(g.a.rounding)
    if execution == "scaled_mm" and not any(g.a.kind == g.b.kind == "fp8" for g in gemms):
        raise ValueError(f"precision {spec!r}: {name} has no FP8 GEMM for torch._scaled_mm (gemm=scaled_mm runs "
                         f"fp8-tensorwise, fp8-rowwise, fp8-blockwise); use gemm=auto or gemm=emulate")
    return recipe


def with_options(recipe: Recipe, **opts) -> Recipe:
    """The same recipe with other options (e.g. sr=0, gemm="emulate"), re-parsed from its spec."""
    execution = opts.pop("gemm", recipe.execution)
    spec = recipe.name + ":" + ",".join([f"{k}={v}" for k, v in {**recipe.options, **opts}.items()]
                                        + ["keep=" + "+".join(recipe.keep), "gemm=" + execution])
    return replace(get_recipe(spec), spec=spec)
