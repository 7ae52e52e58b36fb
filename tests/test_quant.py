"""Absmax quantization: the stated error bound, exact int4 packing, zero groups, bytes, array round trips."""

import numpy as np
import pytest
import torch

from fedtp_flwr.model.quant import QMAX, QTensor, dequantize, quantize, quantized_nbytes

# Per row, per group dividing the columns, and per group with a shorter last group (37 = 7 * 5 + 2).
GROUPINGS = [None, 8, 5]


def element_scales(q: QTensor) -> torch.Tensor:
    """The scale each element of q was quantized with, [rows, cols]."""
    rows, cols = q.shape
    width = q.group_size or cols
    return q.scale.repeat_interleave(width, dim=1)[:, :cols]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", GROUPINGS)
def test_error_is_at_most_half_a_scale_per_element(bits, group_size):
    t = torch.randn(7, 37, generator=torch.Generator().manual_seed(bits)) * 3
    q = quantize(t, bits, group_size)
    err = (dequantize(q) - t).abs()
    bound = element_scales(q) / 2
    assert bool((err <= bound * (1 + 1e-5)).all()), (err - bound).max()
    # Not vacuous: quantization really rounds, and each group's absmax element lands on +-qmax.
    assert err.max() > 0 and err.max() > bound.max() / 4
    values = dequantize(q) / element_scales(q)
    assert torch.allclose(values.abs().amax(), torch.tensor(float(QMAX[bits])))


@pytest.mark.parametrize("bits", [8, 4])
def test_grouping_lowers_the_error_bound(bits):
    """A group's scale is its own absmax / qmax, so a row with one outlier only coarsens that group."""
    t = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    t[:, 0] = 50.0
    per_row, per_group = (dequantize(quantize(t, bits, g)) - t for g in (None, 16))
    assert per_group[:, 16:].abs().max() < per_row[:, 16:].abs().max() / 5


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cols", [9, 10])  # odd and even column counts
def test_values_on_the_grid_round_trip_exactly(bits, cols):
    """Integers in [-qmax, qmax] with qmax in every row have scale 1 and come back bit for bit: this is
    the int4 packing round trip (both nibbles, odd last column) seen through the public API."""
    qmax = QMAX[bits]
    gen = torch.Generator().manual_seed(cols)
    t = torch.randint(-qmax, qmax + 1, (6, cols), generator=gen).float()
    t[:, 0] = qmax
    q = quantize(t, bits)
    assert torch.equal(q.scale, torch.ones(6, 1))
    assert torch.equal(dequantize(q), t)


def test_int4_byte_layout():
    """Byte j holds column 2j in the low nibble and 2j+1 in the high nibble, as q + 8; an odd last
    column's missing partner is 8 (zero)."""
    q = quantize(torch.tensor([[-7.0, 7.0, 0.0]]), 4)
    assert q.data.dtype == torch.uint8
    assert q.data.tolist() == [[(-7 + 8) | ((7 + 8) << 4), (0 + 8) | (8 << 4)]]
    assert dequantize(q).tolist() == [[-7.0, 7.0, 0.0]]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", GROUPINGS)
def test_zero_rows_and_groups_dequantize_to_zero(bits, group_size):
    t = torch.randn(4, 37, generator=torch.Generator().manual_seed(1))
    t[1] = 0.0
    t[2, :10] = 0.0  # a whole group when group_size is 5 or 8
    q = quantize(t, bits, group_size)
    out = dequantize(q)
    assert bool(torch.isfinite(q.scale).all()) and bool(torch.isfinite(out).all())
    assert q.scale[1].eq(0).all() and out[1].eq(0).all()
    assert out[2, :10].eq(0).all() if group_size in (5, 8) else True


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("shape", [(3, 0), (0, 4)])
def test_empty_tensors(bits, shape):
    """The rest of a W=1 model is empty; it still quantizes, travels and dequantizes."""
    t = torch.empty(shape)
    q = quantize(t, bits)
    assert dequantize(q).shape == shape
    assert torch.equal(dequantize(QTensor.from_arrays(q.to_arrays(), bits, shape, None)), t)


def test_bits16_is_plain_bfloat16():
    t = torch.randn(5, 6)
    q = quantize(t, 16)
    assert q.scale is None and q.data.dtype == torch.bfloat16
    assert torch.equal(dequantize(q), t.bfloat16().float())
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


def test_nbytes():
    """int8: 1 byte + a float32 scale per group; int4: half a byte + the scales; bf16: 2 bytes."""
    rows, cols = 256, 1024
    t = torch.randn(rows, cols)
    fp32 = rows * cols * 4
    expected = {
        (8, None): rows * cols + rows * 4,
        (8, 128): rows * cols + rows * 8 * 4,
        (4, None): rows * cols // 2 + rows * 4,
        (4, 128): rows * cols // 2 + rows * 8 * 4,
        (16, None): rows * cols * 2,
    }
    for (bits, g), n in expected.items():
        q = quantize(t, bits, g)
        assert q.nbytes == n == quantized_nbytes((rows, cols), bits, g), (bits, g)
    assert 1 / 8 < quantize(t, 4).nbytes / fp32 < 1 / 8 + 0.001  # int4 ~ 1/8 of fp32 plus the scales
    assert quantized_nbytes((5, 7), 4, 3) == 5 * 4 + 5 * 3 * 4  # odd columns round up; 3 groups per row


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("group_size", [None, 5])
def test_arrays_round_trip_bit_for_bit(bits, group_size):
    """to_arrays gives plain numpy dtypes (bf16 as int16); from_arrays of their numpy copies is exact."""
    t = torch.randn(7, 37)
    q = quantize(t, bits, group_size)
    arrays = {k: v.numpy().copy() for k, v in q.to_arrays().items()}  # what an ArrayRecord holds
    expected = {8: {"q": np.int8, "scale": np.float32}, 4: {"q": np.uint8, "scale": np.float32}, 16: {"q": np.int16}}
    assert {k: v.dtype.type for k, v in arrays.items()} == expected[bits]
    back = QTensor.from_arrays(arrays, bits, (7, 37), group_size)
    assert back.data.dtype == q.data.dtype and torch.equal(back.data.view(torch.uint8), q.data.view(torch.uint8))
    assert torch.equal(dequantize(back), dequantize(q))


def test_from_arrays_refuses_what_does_not_fit():
    q = quantize(torch.randn(4, 10), 4, 5)
    good = q.to_arrays()
    with pytest.raises(ValueError, match="keys"):
        QTensor.from_arrays({"q": good["q"]}, 4, (4, 10), 5)
    with pytest.raises(ValueError, match="'q'"):
        QTensor.from_arrays(good, 4, (4, 12), 5)  # the receiver expected another shape
    with pytest.raises(ValueError, match="'scale'"):
        QTensor.from_arrays(good, 4, (4, 10), None)  # or another grouping
    with pytest.raises(ValueError, match="'q'"):
        QTensor.from_arrays({**good, "q": good["q"].to(torch.int8)}, 4, (4, 10), 5)
    with pytest.raises(ValueError, match="finite"):
        QTensor.from_arrays({**good, "scale": -good["scale"]}, 4, (4, 10), 5)


def test_quantize_refuses_bad_input():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(2, 2), 3)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(2, 2), 8, 0)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 2, 2), 8)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([[1.0, float("inf")]]), 8)
