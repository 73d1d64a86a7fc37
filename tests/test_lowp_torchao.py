"""moekit's MX codecs against torchao's own (`torchao.prototype.mx_formats.to_mx` / `to_dtype`), an
independent implementation of OCP MX v1.0: the same E8M0 scales, the same elements (E2M1 packed two per
byte in the same order, E4M3, E5M2), the same dequantized values, over magnitudes from 1e-3 to 1e3."""

from __future__ import annotations

import pytest
import torch

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")

from moekit.lowp.mx import mx_dequantize, mx_quantize, pack_e2m1  # noqa: E402

ELEMS = [("e2m1", torch.float4_e2m1fn_x2), ("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)]


def operand():
    torch.manual_seed(0)
    x = torch.randn(16, 256) * torch.logspace(-3, 3, 16)[:, None]
    x[0, :32] = 0.0  # an all-zero block
    x[1, 5] = 1e4  # an outlier that sets its block's scale
    return x


@pytest.mark.parametrize("elem, torch_dtype", ELEMS)
def test_scales_elements_and_values_equal_torchao(elem, torch_dtype):
    x = operand()
    scale_ref, data_ref = mx_tensor.to_mx(x, torch_dtype, 32)
    codes, scales = mx_quantize(x, elem=elem, block=32)
    assert torch.equal(scales, scale_ref.view(torch.uint8))
    if elem == "e2m1":
        assert torch.equal(pack_e2m1(codes), data_ref.view(torch.uint8))
    else:
        assert torch.equal(codes.view(torch.uint8), data_ref.view(torch.uint8))
    ref = mx_tensor.to_dtype(data_ref, scale_ref, torch_dtype, 32, torch.float32)
    assert torch.equal(mx_dequantize(codes, scales, elem=elem, block=32), ref)
