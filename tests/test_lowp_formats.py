"""Low-precision formats (moekit.lowp.formats, moekit.lowp.mx) against torch's float8 dtypes and the OCP
spec's value tables: decode tables, bit-exact encoding on a grid with the extremes (ties, subnormals,
saturation, zero, inf, NaN), MX scales and elements, E2M1 packing, scaled FP8, and stochastic rounding's
unbiasedness."""

import math

import pytest
import torch

from moekit.lowp.formats import (E2M1, E4M3, E5M2, TORCH_DTYPES, decode, encode, fp8_fake_quant, fp_round,
                                 value_table)
from moekit.lowp.mx import mx_dequantize, mx_fake_quant, mx_quantize, pack_e2m1, unpack_e2m1
from moekit.lowp.recipes import Operand

FP8 = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)]
# OCP MX v1.0, table 4 (FP4 E2M1): the positive values of codes 0..7
E2M1_SPEC = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def torch_values(dtype):
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def same(a, b):
    return torch.equal(a.nan_to_num(1234.5), b.nan_to_num(1234.5)) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("fmt,dtype", FP8)
def test_fp8_decode_table_is_torchs(fmt, dtype):
    assert same(value_table(fmt), torch_values(dtype))
    assert same(decode(torch.arange(256, dtype=torch.uint8), fmt), torch_values(dtype))


def test_spec_value_tables():
    assert value_table(E2M1).tolist()[:8] == E2M1_SPEC
    assert value_table(E2M1).tolist()[8:] == [-v for v in E2M1_SPEC]
    assert math.copysign(1, value_table(E2M1)[8].item()) == -1  # code 8 is -0
    t4 = value_table(E4M3)
    assert t4[0x7E] == 448 and t4[0x01] == 2 ** -9 and t4[0x08] == 2 ** -6 and t4[0x7F].isnan()  # max, subnormal, normal
    t5 = value_table(E5M2)
    assert t5[0x7B] == 57344 and t5[0x01] == 2 ** -16 and t5[0x7C] == math.inf and t5[0x7D].isnan()


def grid(fmt, dtype):
    """Every value, every midpoint (ties), just either side of them, random normals and subnormals, extremes."""
    v = torch_values(dtype)
    fin = v[torch.isfinite(v)].unique()
    mids = (fin[1:] + fin[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    return torch.cat([fin, mids, mids.nextafter(torch.tensor(math.inf)), mids.nextafter(torch.tensor(-math.inf)),
                      torch.randn(20000, generator=g) * fmt.max / 8, torch.randn(20000, generator=g) * 2.0 ** fmt.emin,
                      torch.tensor([fmt.max, -fmt.max, fmt.max * 1.03, fmt.max * 1.2, 1e30, -1e30, 0.0, -0.0,
                                    1e-45, -1e-45, 2.0 ** (fmt.emin - fmt.mbits - 1), math.inf, -math.inf,
                                    math.nan])])


@pytest.mark.parametrize("fmt,dtype", FP8)
def test_fp8_encode_bit_exact_with_torch(fmt, dtype):
    x = grid(fmt, dtype)
    # torch saturates E4M3 (inf too) and lets E5M2 overflow to inf: our two modes
    mine = encode(x, fmt, saturate=fmt is E4M3)
    assert torch.equal(mine, x.to(dtype).view(torch.uint8))
    if fmt is E5M2:  # saturating: everything past the max is the max, inf included
        sat = encode(torch.tensor([6e4, 1e30, math.inf, -math.inf]), fmt, saturate=True)
        assert sat.tolist() == [0x7B, 0x7B, 0x7B, 0xFB]


@pytest.mark.parametrize("fmt,dtype", FP8)
def test_fp8_round_trips(fmt, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    values = decode(codes, fmt)
    ok = ~values.isnan()
    assert torch.equal(encode(values[ok], fmt, saturate=False), codes[ok])  # -0 and inf included
    assert same(decode(encode(values, fmt, saturate=False), fmt), values)


def test_e2m1_rounding_hand_worked():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 100.0, math.inf, -0.0, -0.3, -5.0])
    # ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; above 6 saturates
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, -0.0, -0.5, -4.0]
    got = decode(encode(x, E2M1), E2M1)
    assert got.tolist() == want and torch.signbit(got[11])
    assert encode(torch.tensor(E2M1_SPEC), E2M1).tolist() == list(range(8))


def test_mx_scale_rule_and_elements():
    x = torch.zeros(5, 32)
    x[0, 0], x[0, 1] = 5.0, 0.3  # amax 5: floor(log2 5) = 2, minus emax 2 -> 2**0
    x[1] = 0.0  # all zero: the smallest scale, 2**-127
    x[2, 3] = math.nan  # a NaN anywhere: the NaN scale
    x[3, 0] = 1e38  # floor(log2 1e38) = 126 -> 124
    x[4, 0] = 7.5  # 7.5 / 2**0 clips to 6
    codes, scales = mx_quantize(x, "e2m1")
    assert scales[:, 0].tolist() == [127, 0, 255, 127 + 124, 127]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    y = mx_dequantize(codes, scales, "e2m1")
    assert y[0, 0] == 4.0 and y[0, 1] == 0.5 and y[4, 0] == 6.0 and y[2].isnan().all() and (y[1] == 0).all()
    # scales are E8M0: the same bytes as torch's float8_e8m0fnu of the power of two
    e = scales.int() - 127
    ok = scales != 255
    assert torch.equal(torch.exp2(e[ok].double()).float().to(torch.float8_e8m0fnu).view(torch.uint8), scales[ok])
    assert torch.equal(torch_values(torch.float8_e8m0fnu)[:255].double(), torch.exp2(torch.arange(255.) - 127))


@pytest.mark.parametrize("elem,emax", [("e4m3", 8), ("e5m2", 15)])
def test_mxfp8_elements_are_torchs_cast(elem, emax):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-30, 30, 64)[:, None]
    x[0, :32] = 0.0
    codes, scales = mx_quantize(x, elem)
    assert codes.dtype == TORCH_DTYPES[elem]
    x_GB = x.reshape(64, 4, 32)
    exp = torch.frexp(x_GB.abs().amax(-1))[1] - 1 - emax
    exp = torch.where(x_GB.abs().amax(-1) > 0, exp, -127).clamp(-127, 127)
    assert torch.equal(scales.int() - 127, exp)
    fmax = {"e4m3": E4M3, "e5m2": E5M2}[elem].max
    ref = torch.ldexp(x_GB, -exp[..., None]).clamp(-fmax, fmax)  # MX elements saturate; torch's E5M2 cast would not
    assert torch.equal(codes.view(torch.uint8), ref.reshape(64, 128).to(TORCH_DTYPES[elem]).view(torch.uint8))
    assert torch.equal(mx_fake_quant(x, elem), mx_dequantize(codes, scales, elem))


def test_pack_e2m1_layout():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x0F]]  # element 2j in the low nibble (gpt-oss *_blocks)
    c = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    assert torch.equal(unpack_e2m1(pack_e2m1(c)), c)
    assert pack_e2m1(c).view(torch.float4_e2m1fn_x2).shape == (3, 32)  # torch's packed FP4 dtype, same bytes


@pytest.mark.parametrize("scaling", ["tensor", "row", "tile", "block"])
@pytest.mark.parametrize("pow2", [False, True])
def test_scaled_fp8_matches_a_per_group_loop(scaling, pow2):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 300, generator=g) * torch.rand(200, 1, generator=g) * 50
    got = fp8_fake_quant(x, "e4m3", scaling, pow2=pow2)
    rows = {"tensor": 200, "row": 1, "tile": 1, "block": 128}[scaling]
    cols = {"tensor": 300, "row": 300, "tile": 128, "block": 128}[scaling]
    for r in range(0, 200, rows):
        for c in range(0, 300, cols):
            blk = x[r:r + rows, c:c + cols]
            s = blk.abs().max() / 448
            if pow2:
                s = 2.0 ** math.ceil(math.log2(s))
            want = (blk / s).to(torch.float8_e4m3fn).float() * s
            assert torch.equal(got[r:r + rows, c:c + cols], want)


# stochastic rounding: z = (mean - x) / sqrt(var / N) per element, var = (x - lo)(hi - x) the exact Bernoulli
# variance; with 64 elements and |z| < 4.5 the false-alarm rate is below 64 * 6.8e-6 = 4.4e-4
N_DRAWS, Z_MAX = 4000, 4.5


def z_scores(samples_NX, x, lo, hi):
    var = ((x - lo) * (hi - x)).clamp(min=1e-30)
    return (samples_NX.double().mean(0) - x) / torch.sqrt(var / samples_NX.shape[0])


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1])
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(fmt):
    g = torch.Generator().manual_seed(3)
    table = value_table(fmt)
    pos = table[torch.isfinite(table) & (table > 0)].unique()
    n = min(64, pos.numel() - 1)
    lo, hi = pos[:n].double(), pos[1:n + 1].double()
    x = lo + (hi - lo) * (0.1 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64))  # off-grid, below the midpoint
    x32 = x.float()
    x = x32.double()
    draws = fp_round(x32.expand(N_DRAWS, n), fmt, "stochastic", generator=g)
    assert set(draws.unique().tolist()) <= set(lo.tolist() + hi.tolist())
    assert z_scores(draws, x, lo, hi).abs().max() < Z_MAX
    nearest = fp_round(x32.expand(N_DRAWS, n), fmt, "nearest")
    assert torch.equal(nearest[0].double(), lo)  # always down: biased
    assert z_scores(nearest, x, lo, hi).abs().min() > 3 * Z_MAX  # the same test flags every element


def test_mxfp4_sr_with_three_quarters_is_unbiased_at_the_block_max():
    """x3/4 before rounding: a block max of 7.5 (which round-to-nearest clips to 6) is unbiased under SR."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, 32, generator=g) * 8 - 4
    x[:32, 0], x[32:, 0] = 7.5, 5.0  # scale 2**0 (of x, not of 3/4 x): x3/4 keeps them below 6
    op_sr, op_rtn = Operand("mx", "e2m1", rounding="stochastic"), Operand("mx", "e2m1")
    mean = torch.stack([op_sr.quantize(x, g) for _ in range(2000)]).double().mean(0)
    spread = 2.0 * 4 / 3  # the widest gap between E2M1 neighbours (4 to 6), times 4/3
    tol = Z_MAX * spread / 2 / math.sqrt(2000)
    assert (mean - x.double()).abs().max() < tol
    assert (op_rtn.quantize(x)[:32, 0] == 6).all()  # round-to-nearest clips 7.5
