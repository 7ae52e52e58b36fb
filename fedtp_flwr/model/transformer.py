"""Llama 3 / 3.2 in plain, trainable PyTorch, with Meta's module tree and state-dict keys.

Differences from Meta's reference `llama_models/llama3/model.py`, all deliberate:
- no fairscale: plain `nn.Linear` / `nn.Embedding`;
- no KV cache and no `inference_mode`: this model is for training;
- RoPE scaling factor is a field (`rope_scale_factor`, default 32, the Llama 3.2 1B/3B value; the
  reference hard-codes 8);
- `head_dim` and `hidden_dim` may be given explicitly, so a tensor-parallel slice (fewer heads, fewer FFN
  units, same `dim`) is the same class built from other args (see `sharding.shard_args`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    """Takes the keys of Meta's params.json; checks its invariants when built."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    rope_scale_factor: float = 32.0  # Llama 3.2 1B/3B; Llama 3.1 uses 8
    rope_high_freq_factor: float = 4.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    # Not in Meta's params.json: set by shard_args for a tensor-parallel slice.
    head_dim: Optional[int] = None
    hidden_dim: Optional[int] = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelArgs.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ValueError(f"ModelArgs.dim={self.dim} must be divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"ModelArgs.ffn_dim_multiplier must be > 0, got {self.ffn_dim_multiplier!r}")
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        for name in ("head_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelArgs.head_dim={self.head_dim} must be even for RoPE")
        for name in ("norm_eps", "rope_theta", "rope_scale_factor"):
            value = getattr(self, name)
            if not value > 0:  # also refuses NaN
                raise ValueError(f"ModelArgs.{name} must be > 0, got {value!r}")
        if not self.rope_high_freq_factor > 1.0:  # Llama 3 scaling divides by (high - low), low = 1
            raise ValueError(f"ModelArgs.rope_high_freq_factor must be > 1, got {self.rope_high_freq_factor!r}")

    @classmethod
    def from_params(cls, params: dict) -> "ModelArgs":
        """Build from a params.json dict, refusing keys this model does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown model parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**params)

    def to_params(self) -> dict:
        return dataclasses.asdict(self)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's SwiGLU hidden-size rule: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Named model flavors. Keys are Meta's params.json keys.
PRESETS: dict[str, dict] = {
    # The seed's model: 3,606,752,256 parameters (output layer stored separately, as in Meta's checkpoint).
    "llama3.2-3b": dict(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
        ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
        max_seq_len=128256,
    ),
    "llama3.2-1b": dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
        ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
        max_seq_len=131072,
    ),
    # Llama 3.1 8B and 70B (Meta's params.json; 8,030,261,248 and 70,553,706,496 parameters): used by the
    # benchmarks that count bytes and memory at larger scales (bench/communication.py); W in 1, 2, 4, 8.
    "llama3.1-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=8.0,
        max_seq_len=131072,
    ),
    "llama3.1-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=8.0,
        max_seq_len=131072,
    ),
    # Small CPU flavor for demos and tests: same architecture and tokenizer, W in 1, 2, 4.
    "llama3.2-tiny": dict(
        dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128256, multiple_of=32,
        ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
        max_seq_len=2048,
    ),
    # Byte-level model for CPU experiments (tokenizer-path "bytes"): 3.1M parameters, 96% of them split,
    # unlike the 128k-vocabulary presets whose small versions are nearly all embeddings. W in 1, 2, 4.
    "bytes-small": dict(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
        vocab_size=260,  # data.ByteTokenizer().n_words: 256 bytes + 4 special tokens
        multiple_of=64, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
        max_seq_len=1024,
    ),
}


def preset_args(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------- RoPE

# Llama 3 RoPE scaling: this model supports low_freq_factor 1 and an original context of 8192 only
# (every Llama 3.1 / 3.2 checkpoint); the scaling factor and the high-frequency factor are ModelArgs fields.
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_ORIGINAL_CONTEXT = 8192


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], float32, with Llama 3 scaling when use_scaled_rope."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32)[: hd // 2] / hd))
    if not args.use_scaled_rope:
        return freqs
    low_freq_factor, high_freq_factor = LLAMA3_LOW_FREQ_FACTOR, args.rope_high_freq_factor
    old_context_len = LLAMA3_ORIGINAL_CONTEXT
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scale_factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, (1 - smooth) * new_freqs / args.rope_scale_factor + smooth * new_freqs, new_freqs)


def rope_tables(args: ModelArgs, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [T, head_dim/2], float32. Cheap enough to build per forward (no buffer to shard)."""
    freqs = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, hd] in Meta's interleaved layout: pairs (x[2i], x[2i+1]) are one complex number."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, hd/2)
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# --------------------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query attention; query head h reads kv head h // (n_heads / n_kv_heads)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, vocab] (float32 when the weights are)."""
        return self.output(self.hidden_states(tokens))

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> the final-norm hidden states [B, T, dim] that `output` maps to logits (training
        computes the loss from these in chunks, never holding all [B*T, vocab] logits: chunked_loss.py)."""
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}")
        cos, sin = rope_tables(self.args, T, tokens.device)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return self.norm(h)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Initialise every parameter from `seed`, independent of the device:
        - tok_embeddings, wq, wk, wv, w1, w3, output: normal(0, std);
        - wo, w2 (the projections back into the residual stream): normal(0, std / sqrt(2 * n_layers));
        - RMSNorm weights: ones.
        Values are drawn on the CPU so the same seed gives the same model on any device.
        """
        gen = torch.Generator().manual_seed(seed)
        out_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            s = out_std if name.endswith(("wo.weight", "w2.weight")) else std
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, s, generator=gen))


def build_model(
    args: ModelArgs, device="cpu", dtype: torch.dtype = torch.float32, seed: Optional[int] = 0
) -> Transformer:
    """Build on the meta device (allocates nothing), then materialise on `device` in `dtype`.
    With seed=None the weights are left uninitialised (for loading a checkpoint into)."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model = model.to_empty(device=device)
    if seed is not None:
        model.init_weights(seed)
    return model


def count_parameters(model_or_state: nn.Module | dict) -> int:
    tensors = model_or_state.values() if isinstance(model_or_state, dict) else model_or_state.parameters()
    return sum(t.numel() for t in tensors)
