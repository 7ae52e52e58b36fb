"""Tensors <-> Flower ArrayRecords, with an exact bfloat16 encoding.

Flower's Array stores numpy `.npy` bytes, and numpy has no bfloat16: a bfloat16 tensor travels as its
raw 16 bits viewed as int16 and is viewed back on arrival, bit for bit. Which wire dtype a message uses
is set by the run config (`wire-dtype`), known to both sides; the receiver checks every Array's dtype.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# The numpy dtype an Array of each wire dtype carries.
NUMPY_DTYPE: dict[str, str] = {"float32": "float32", "bfloat16": "int16", "float16": "float16"}
NPY_HEADER_LIMIT = 65536 + 16  # magic, header length and the longest header numpy writes for any shape


def check_wire_dtype(name: str) -> str:
    if name not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {name!r} is not supported; choose one of {sorted(WIRE_DTYPES)}")
    return name


def encode(state: Mapping[str, torch.Tensor], wire_dtype: str = "float32", release: bool = False) -> ArrayRecord:
    """State dict -> ArrayRecord in `wire_dtype` (one copy per tensor, into the .npy bytes). release=True pops
    each tensor from `state` (a dict) once copied, so a state nothing else references is freed a tensor at a
    time: it and its encoded form never exist side by side."""
    dtype = WIRE_DTYPES[check_wire_dtype(wire_dtype)]
    record = ArrayRecord()
    for name in list(state):
        t = (state.pop(name) if release else state[name]).detach().to("cpu", dtype).contiguous()
        if dtype == torch.bfloat16:
            t = t.view(torch.int16)
        record[name] = Array(t.numpy())
    return record


def _npy_view(array: Array) -> np.ndarray:
    """A read-only numpy view of an Array's .npy bytes, without copying the data.

    The bytes are checked against what the Array declares (its dtype and shape fields): the header's dtype
    (byte order included) and shape must equal them, and the data must be exactly that many bytes."""
    # Only the header is read through a file object: a BytesIO over a bytearray (as pull.py builds) would
    # copy the whole buffer. A .npy 1.0 header is at most 65535 bytes; a longer one is refused.
    buf = io.BytesIO(bytes(memoryview(array.data)[:NPY_HEADER_LIMIT]))
    version = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    if fortran or dtype.hasobject:
        raise ValueError("array is not a plain C-ordered numeric array")
    if dtype != np.dtype(array.dtype):
        raise ValueError(f"the .npy header's dtype {dtype.str} differs from the declared dtype {array.dtype}")
    if tuple(shape) != tuple(array.shape):
        raise ValueError(f"the .npy header's shape {tuple(shape)} differs from the declared shape {tuple(array.shape)}")
    count = int(np.prod(shape))
    if len(array.data) - buf.tell() != count * dtype.itemsize:
        raise ValueError(f"{len(array.data) - buf.tell()} data bytes, expected {count * dtype.itemsize} for shape "
                         f"{tuple(shape)} {dtype.name}")
    return np.frombuffer(array.data, dtype=dtype, offset=buf.tell(), count=count).reshape(shape)


def decode(record: ArrayRecord, wire_dtype: str = "float32", dtype: torch.dtype | None = torch.float32,
           copy: bool = True) -> dict[str, torch.Tensor]:
    """ArrayRecord in `wire_dtype` -> state dict in `dtype` (None: keep the wire dtype).

    With copy=False and dtype equal to the wire dtype, tensors are read-only views of the record's bytes
    (no copy of the model); do not write to them."""
    check_wire_dtype(wire_dtype)
    expected = NUMPY_DTYPE[wire_dtype]
    out = {}
    for name, array in record.items():
        if array.dtype != expected:
            raise ValueError(f"array {name!r} has dtype {array.dtype}, expected {expected} for wire dtype {wire_dtype}")
        try:
            view = _npy_view(array)
        except ValueError as e:
            raise ValueError(f"array {name!r}: {e}") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the numpy view is read-only
            t = torch.from_numpy(view)
        if wire_dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        elif copy:
            t = t.clone()
        out[name] = t
    return out


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data the record carries (what dominates the message on the wire)."""
    return sum(len(a.data) for a in record.values())


# ------------------------------------------------------------------------------ updates as low-bit deltas
# upload-codec int8-delta / int4-delta: a client uploads trained - received of every slice tensor, absmax-quantized
# per DELTA_GROUP values of a row (model/quant.py's layout; a 1-D tensor as one row), with stochastic rounding so
# that the server's mean of the updates is unbiased. The record holds "<name>:q" and "<name>:scale" per tensor.
# 128 values per float32 scale, as the small-GPU recipes' frozen rest (context-group-size): int4 costs 0.53 bytes
# per value (0.56 at 64), which is what brings the 3B W=2 recipe's round under 3 GB (bench/communication.py).
DELTA_GROUP = 128

# The codecs, each with the bits of its blockwise absmax payload (None: the values travel in wire-dtype). The one
# table of them: config.py's choices, the client's encoding and decoding and the server's checks read it.
UPLOAD_CODEC_BITS: dict[str, int | None] = {"weights": None, "int8-delta": 8, "int4-delta": 4}
DOWNLOAD_CODEC_BITS: dict[str, int | None] = {"wire": None, "int8": 8, "int4": 4}


def _as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))


def encode_quantized(state: Mapping[str, torch.Tensor], bits: int, generator: torch.Generator | None = None,
                     minus=None) -> ArrayRecord:
    """{name: tensor} -> the record of its blockwise absmax quantization ("<name>:q", "<name>:scale"), one tensor at
    a time; with `minus(name)`, of tensor - minus(name) (an update); with `generator`, stochastic rounding."""
    from fedtp_flwr.model.quant import quantize_rows

    record = ArrayRecord()
    for name, t in state.items():
        x = t.detach().to("cpu", torch.float32)
        if minus is not None:
            x = x - minus(name).float()
        q = quantize_rows(x.reshape(_as_rows(tuple(x.shape))), bits, DELTA_GROUP, generator)
        for part, a in q.to_arrays().items():
            record[f"{name}:{part}"] = Array(a.numpy())
    return record


def encode_delta(trained: Mapping[str, torch.Tensor], received, bits: int,
                 generator: torch.Generator) -> ArrayRecord:
    """{name: trained tensor} and received(name) -> the tensor it started from -> the record of their quantized
    updates, one tensor at a time (stochastic rounding: the server's mean of the updates is unbiased)."""
    return encode_quantized(trained, bits, generator, minus=received)


def dequantized(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]], bits: int,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A quantized record (encode_quantized) -> {name: tensor of its shape in `dtype`}, checked (decode_delta)."""
    from fedtp_flwr.model.quant import dequantize

    return {k: dequantize(q, dtype).reshape(shapes[k]) for k, q in decode_delta(record, shapes, bits).items()}


def delta_shapes(shapes: Mapping[str, tuple[int, ...]], bits: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Array key -> (shape, numpy dtype) of the delta record of tensors of `shapes`."""
    from fedtp_flwr.model.quant import layout

    out = {}
    for name, shape in shapes.items():
        data_shape, data_dtype, scale_shape = layout(_as_rows(tuple(shape)), bits, DELTA_GROUP)
        out[f"{name}:q"] = (tuple(data_shape), str(data_dtype).removeprefix("torch."))
        out[f"{name}:scale"] = (tuple(scale_shape), "float32")
    return out


def decode_delta(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]], bits: int) -> dict:
    """The delta record -> {name: QTensor of shape _as_rows(shape)}, views of the record's bytes; the layout,
    dtypes and finite, non-negative scales are checked (quant.QTensor.from_arrays); a missing or extra key is
    refused."""
    from fedtp_flwr.model.quant import QTensor

    want = delta_shapes(shapes, bits)
    if set(record) != set(want):
        missing, extra = sorted(set(want) - set(record)), sorted(set(record) - set(want))
        raise ValueError(f"delta arrays differ: missing {missing[:3]}, unexpected {[k[:80] for k in extra[:3]]}")
    out = {}
    for name, shape in shapes.items():
        arrays = {}
        for part in ("q", "scale"):
            a = record[f"{name}:{part}"]
            if a.dtype != want[f"{name}:{part}"][1]:
                raise ValueError(f"{name}:{part}: dtype {str(a.dtype)[:40]}, expected {want[f'{name}:{part}'][1]}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a read-only view of the bytes
                arrays[part] = torch.from_numpy(_npy_view(a))
        try:
            out[name] = QTensor.from_arrays(arrays, bits, _as_rows(tuple(shape)), DELTA_GROUP)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out
