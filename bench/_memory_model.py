"""Analytic peak memory of a client's local training, from the client model as the client builds it.

A memory option is a set of run-config keys (`slice-mode`, `context-bits`, `context-group-size`,
`vocab-parallel`, `client-param-dtype`, `optimizer`, `optimizer-in-backward`, `precision`,
`gradient-checkpointing`, `loss-chunk-tokens`). `client_peak` builds the very model a client would build
for those keys (independent: the sub-model; context: the full-width model with its frozen low-bit rest) on
the meta device, and counts, in bytes:

- weights: the trainable parameters, in their dtype (4 B float32, 2 B bfloat16);
- rest: the frozen low-bit context (the model's buffers: int8/int4 codes and float32 scales, or bf16);
- optimizer state, per parameter as the optimizer allocates it: torch AdamW 8 B (float32 exp_avg and
  exp_avg_sq); torchao's AdamW on bf16 weights 4 B (bf16 state); torchao AdamW8bit 2 x (1 B + a float32
  scale per 256 values), AdamW4bit 2 x (0.5 B + a float32 scale per 128 values), for tensors of at least
  4096 values that divide into blocks; smaller tensors keep a plain state in the weight's dtype;
- gradients, in the weight's dtype: all of them at the end of backward; with the optimizer step in
  backward only the ones of the block backward is working on (each is freed by its step);
- the optimizer step's temporaries (STEP_TEMP_BYTES, measured), for the largest tensor stepped at once;
- activations: what autograd saves in one forward, counted per block on the meta device
  (`_common.activation_profile`), attention as a flash kernel saves it, bf16 autocast emulated; with
  gradient checkpointing each block keeps only its input and one block is recomputed at a time;
- transients of the loss: one chunk's float32 logits, their float32 gradient and its compute-dtype copy
  (all tokens at once when `loss-chunk-tokens` is 0), the output weight's gradient accumulator (in its dtype), and
  the output weight's compute-dtype copy (bf16 autocast on float32 weights);
- a context layer's rebuild of its full weight, one block of rows at a time (context.ROW_BLOCK_VALUES values,
  ~9 B each to dequantize plus the block in the compute dtype), during its block's forward and backward.

Backward walks the blocks in reverse; while it works on block b, the activations of blocks <= b are alive,
and the gradients of blocks >= b (all of them, or only b's with the step in backward) exist, as do b's
transients. The peak is weights + rest + state + the largest of these. Not counted: kernel workspaces,
the allocator's fragmentation, the CUDA context (~0.5 GB per process on a GPU).
"""

from __future__ import annotations

import math
from unittest import mock

import _common
import torch
from torch import nn

from fedtp_flwr.model import ModelArgs, Transformer, build_model, context
from fedtp_flwr.model.context import (
    DEQUANT_BYTES_PER_VALUE,
    ROW_BLOCK_VALUES,
    FrozenContextLinear,
    build_context_model,
    rest_shapes,
)
from fedtp_flwr.model.quant import QTensor, layout, quantize
from fedtp_flwr.model.rows import row_slices
from fedtp_flwr.model.sharding import shard_args, slice_shapes
from fedtp_flwr.training import chunked_loss
from fedtp_flwr.training.loop import STEP_BLOCK_VALUES

# The run-config keys of a memory option, with today's defaults (docs/memory.md: "Llama 3.2 3B on GPUs").
BASELINE = {"slice-mode": "independent", "context-bits": 4, "context-group-size": 64, "vocab-parallel": False,
            "client-param-dtype": "float32", "optimizer": "adamw", "optimizer-in-backward": False,
            "precision": "bf16", "gradient-checkpointing": True, "loss-chunk-tokens": 0, "rest-adapter-rank": 0}


def _dtype(opts: dict) -> torch.dtype:
    return torch.bfloat16 if opts["client-param-dtype"] == "bfloat16" else torch.float32


def _meta_qtensor(shape: tuple[int, int], bits: int, group_size: int | None) -> QTensor:
    data_shape, data_dtype, scale_shape = layout(shape, bits, group_size)
    data = torch.empty(data_shape, dtype=data_dtype, device="meta")
    scale = None if scale_shape is None else torch.empty(scale_shape, dtype=torch.float32, device="meta")
    return QTensor(data, scale, bits, tuple(shape), group_size)


def _random_qtensor(shape: tuple[int, int], bits: int, group_size: int | None, device) -> QTensor:
    """A random frozen rest as a client holds it (normal, std 0.02, quantized): written a block of rows at a time
    into the low-bit codes and scales, so no float32 copy of the whole tensor is built (a client receives the
    rest low-bit; the 3B's output rest at W=8 is 345M values, 1.4 GB in float32)."""
    data_shape, data_dtype, scale_shape = layout(shape, bits, group_size)
    data = torch.empty(data_shape, dtype=data_dtype, device=device)
    scale = None if scale_shape is None else torch.empty(scale_shape, dtype=torch.float32, device=device)
    for rows in row_slices(shape[0], shape[1], ROW_BLOCK_VALUES):
        q = quantize(torch.randn(rows.stop - rows.start, shape[1], device=device).mul_(0.02), bits, group_size)
        data[rows] = q.data
        if scale is not None:
            scale[rows] = q.scale
    return QTensor(data, scale, bits, tuple(shape), group_size)


def client_model(args: ModelArgs, world_size: int, opts: dict, device: str = "meta") -> nn.Module:
    """The model a client builds for these options (W=1 is always the full model): on the meta device, or
    on a real one with random weights (normal, std 0.02, drawn in the weights' dtype; the frozen rest quantized a
    block of rows at a time). Building holds the slice twice for a moment, as a client's build does (the slice
    state, then the model's copy of it)."""
    opts = {**BASELINE, **opts}
    dtype = _dtype(opts)
    if opts["slice-mode"] == "context" and world_size > 1:
        vp = opts["vocab-parallel"]
        bits, gs = opts["context-bits"], opts["context-group-size"] or None
        shapes = rest_shapes(args, world_size, vp)
        if device == "meta":
            rest = {n: _meta_qtensor(s, bits, gs) for n, s in shapes.items()}
        else:
            rest = {n: _random_qtensor(s, bits, gs, device) for n, s in shapes.items()}
        state = {k: torch.empty(s, dtype=dtype, device=device) for k, s in slice_shapes(args, world_size, vp).items()}
        for t in state.values() if device != "meta" else ():
            t.normal_(0.0, 0.02)
        return build_context_model(args, 0, world_size, state, rest, device=device, dtype=dtype, vocab_parallel=vp,
                                   rest_adapter_rank=opts["rest-adapter-rank"])
    if device != "meta":
        return build_model(shard_args(args, world_size), device=device, dtype=dtype, seed=0)
    with torch.device("meta"):
        return Transformer(shard_args(args, world_size)).to(dtype)


def _state_bytes(p: torch.Tensor, optimizer: str) -> int:
    n, item = p.numel(), p.element_size()
    if optimizer == "adamw":
        return 2 * n * item  # torch AdamW (float32) or torchao _AdamW on bf16 weights (bf16 state)
    block, code_bytes = {"adamw8bit": (256, 1.0), "adamw4bit": (128, 0.5)}[optimizer]
    if n >= 4096 and n % block == 0:
        qmap = 4 * (256 if optimizer == "adamw8bit" else 16)
        return 2 * (int(n * code_bytes) + 4 * (n // block) + qmap)
    return 2 * n * item


# Temporaries of one torchao low-bit step, bytes per value stepped at once (dequantized moments, the float32
# update, requantization), measured on the CPU (torch.compile's C++ backend) for a 12.6M-value tensor: 26 B
# (4-bit) and 8 B (8-bit); torch's fused AdamW and torchao's bf16 AdamW showed none. GPU kernels may need
# less. With the step in backward a tensor is stepped in row blocks of training.STEP_BLOCK_VALUES values.
STEP_TEMP_BYTES = {"adamw": 0, "adamw8bit": 8, "adamw4bit": 26}


def _step_values(p: torch.Tensor, in_backward: bool) -> int:
    if not in_backward or p.dim() < 2:
        return p.numel()
    rows = max(1, STEP_BLOCK_VALUES // p[0].numel())
    return min(p.shape[0], rows) * p[0].numel()


def _block_of(name: str) -> str:
    if name.startswith("layers."):
        return ".".join(name.split(".")[:2])
    return "tok_embeddings" if name.startswith("tok_embeddings") else "output"  # norm.weight, output.weight


def client_peak(args: ModelArgs, world_size: int, opts: dict, batch: int, seq: int) -> dict:
    """Analytic peak bytes of local training for `opts` (see the module docstring), with its parts."""
    opts = {**BASELINE, **opts}
    model = client_model(args, world_size, opts)
    dtype = _dtype(opts)
    autocast = opts["precision"] == "bf16" and dtype == torch.float32
    params = dict(model.named_parameters())
    weights = sum(p.numel() * p.element_size() for p in params.values())
    rest = sum(b.numel() * b.element_size() for b in model.buffers())
    state = sum(_state_bytes(p, opts["optimizer"]) for p in params.values())
    grads, step_peak = {}, {}  # per block: gradient bytes of each parameter; the largest grad + step temporaries
    temp = STEP_TEMP_BYTES[opts["optimizer"]]
    in_bwd = opts["optimizer-in-backward"]
    for name, p in params.items():
        block = _block_of(name)
        grads.setdefault(block, []).append(p.numel() * p.element_size())
        step = p.numel() * p.element_size() + temp * _step_values(p, in_bwd)
        step_peak[block] = max(step_peak.get(block, 0), step)

    chunk = opts["loss-chunk-tokens"]
    compute = torch.bfloat16 if autocast else dtype
    with mock.patch.object(context, "compute_dtype", lambda x, w: compute), \
            mock.patch.object(chunked_loss, "compute_dtype", lambda x, w: compute):
        profile = _common.activation_profile(args, batch, seq, autocast=autocast, model=model, chunk_tokens=chunk)
    rows = batch * seq if chunk == 0 else min(chunk, batch * seq)
    out_w = model.output.weight
    vocab = args.vocab_size
    loss_transient = rows * vocab * (4 + 4 + (2 if compute == torch.bfloat16 else 4))
    if chunk:
        loss_transient += out_w.numel() * out_w.element_size()  # the output weight's gradient accumulator
        if hasattr(model.output, "slice_grad"):  # vocabulary-parallel: its slice in the compute dtype
            loss_transient += out_w.numel() * compute.itemsize if compute != dtype else 0
        elif compute != dtype:
            loss_transient += out_w.numel() * compute.itemsize  # the bf16 copy of the whole output weight
    else:
        loss_transient = 2 * batch * seq * vocab * 4  # float32 logit gradient and log-softmax (as before)
    # Rebuilding a context layer's full weight a block of rows at a time: the dequantization's temporaries
    # and the block in the compute dtype (context.ROW_BLOCK_VALUES, DEQUANT_BYTES_PER_VALUE).
    rebuild = {}
    for name, m in model.named_modules():
        if isinstance(m, FrozenContextLinear):
            rows = min(m.out_features, max(1, ROW_BLOCK_VALUES // m.in_features))
            cost = rows * m.in_features * (DEQUANT_BYTES_PER_VALUE + compute.itemsize)
            block = "output" if name == "output" else _block_of(name + ".weight")
            rebuild[block] = max(rebuild.get(block, 0), cost)
    for b in profile:
        b["transient"] = (loss_transient if b["block"] == "output" else 0) + rebuild.get(b["block"], 0)
    if opts["gradient-checkpointing"]:
        block_input = batch * seq * args.dim * dtype.itemsize  # the residual stream a block keeps
        for b in profile:
            if b["block"].startswith("layers."):
                b["transient"] += b["saved"]  # recomputed in backward, one block at a time
                b["saved"] = block_input
    live = 0
    for i, b in enumerate(profile):
        saved = sum(x["saved"] for x in profile[: i + 1])
        if in_bwd:  # the block's backward (its transients), then its parameters' steps, one at a time
            live = max(live, saved + max(grads.get(b["block"], [0])) + b["transient"],
                       saved + step_peak.get(b["block"], 0))
        else:
            live = max(live, saved + sum(sum(grads.get(x["block"], [])) for x in profile[i:]) + b["transient"])
    if not in_bwd:  # all gradients between backward and the step, and the step's temporaries
        largest = max(p.numel() for p in params.values())
        live = max(live, sum(sum(v) for v in grads.values()) + temp * largest)
    peak = weights + rest + state + live
    return {"params": sum(p.numel() for p in params.values()), "weights": weights, "rest": rest, "state": state,
            "grads": sum(sum(v) for v in grads.values()), "activations": sum(b["saved"] for b in profile),
            "loss_transient": loss_transient, "peak": peak}


def gb(x: float) -> float:
    return round(x / 1e9, 2)


def llama31(name: str) -> ModelArgs:
    """Llama 3.1 8B and 70B (Meta's params.json; RoPE scaling factor 8)."""
    common = dict(vocab_size=128256, multiple_of=1024, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                  rope_scale_factor=8.0, max_seq_len=131072)
    if name == "llama3.1-8b":
        return ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, **common)
    if name == "llama3.1-70b":
        return ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, **common)
    raise ValueError(name)


def n_params(args: ModelArgs) -> int:
    with torch.device("meta"):
        return sum(math.prod(p.shape) for p in Transformer(args).parameters())


def llama32_3b() -> ModelArgs:
    return _common.model_args("llama3.2-3b")
