"""Llama weights in and out: Meta's consolidated checkpoints and Hugging Face directories.

A Meta directory holds `params.json` + `consolidated.00.pth`, with this package's own names
(`tok_embeddings`, `layers.{i}.attention.wq`, ...) and wq/wk rows in the interleaved RoPE layout the
model uses. A Hugging Face directory holds `config.json` + `model.safetensors` (or shards listed in
`model.safetensors.index.json`) with HF names, and wq/wk rows permuted into the rotate-half layout;
loading undoes that permutation and exporting applies it.

Every load is validated against the state dict of `Transformer(args)` built on the meta device: a missing
key, an unexpected key or a wrong shape is an error that names the checkpoint, never a silent skip.
Only safe formats are read: `torch.load(weights_only=True)` and safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from .sharding import full_shapes
from .transformer import LLAMA3_LOW_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT, ModelArgs, Transformer, ffn_hidden_dim

META_PARAMS = "params.json"
META_WEIGHTS = "consolidated.00.pth"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, generic wrappers
_DROPPED_KEYS = {"rope.freqs"}  # a RoPE buffer some Meta checkpoints store; recomputed from args


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file or directory."""


# ------------------------------------------------------------------------------------- validation


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of Transformer(args) and its shape (built on meta: allocates nothing)."""
    return full_shapes(args)


def check_state_dict(state_dict: Mapping[str, torch.Tensor], args: ModelArgs, source: str) -> None:
    """Raise CheckpointError listing every missing key, unexpected key and shape mismatch at once."""
    expected = expected_shapes(args)
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    if missing:
        problems.append(f"missing {len(missing)} key(s) the model needs: {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) the model does not have: {_short(unexpected)}")
    for k, want in expected.items():
        t = state_dict.get(k)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            problems.append(f"key {k!r} is not a floating-point tensor ({type(t).__name__})")
        elif tuple(t.shape) != want:
            problems.append(f"key {k!r} has shape {tuple(t.shape)} but the model expects {want}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def _short(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(k) for k in items[:limit])
    return f"[{shown}{f', ... and {len(items) - limit} more' if len(items) > limit else ''}]"


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------- Meta


def read_meta_params(path: str | Path) -> ModelArgs:
    """ModelArgs from a params.json. Meta's `rope_scaling_factor` is read as `rope_scale_factor`."""
    path = Path(path)
    params = _read_json(path)
    if "rope_scaling_factor" in params:  # llama-models' name for the same field
        value = params.pop("rope_scaling_factor")
        if value is not None:
            params.setdefault("rope_scale_factor", value)
    if params.get("rope_high_freq_factor", 0) is None:
        params.pop("rope_high_freq_factor")
    try:
        return ModelArgs.from_params(params)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP / torch.compile / wrapper prefixes (`module.`, `_orig_mod.`, `model.`, in any nesting)
    and drop a stored `rope.freqs` buffer. Two keys that collide after stripping are an error."""
    out = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in _DROPPED_KEYS:
            continue
        if name in out:
            raise CheckpointError(f"keys collide after removing wrapper prefixes: {key!r} -> {name!r}")
        out[name] = value
    return out


def load_meta_checkpoint(ckpt_dir: str | Path, device="cpu") -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(args, state dict) from a Meta directory (params.json + consolidated.00.pth), validated against
    Transformer(args). Tensors keep their stored dtype; on the CPU they are memory-mapped, not read."""
    ckpt_dir = Path(ckpt_dir)
    args = read_meta_params(ckpt_dir / META_PARAMS)
    parts = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if len(parts) > 1:
        raise CheckpointError(
            f"{ckpt_dir} holds {len(parts)} model-parallel parts ({[p.name for p in parts]}); "
            f"only single-file checkpoints ({META_WEIGHTS}) are supported"
        )
    path = ckpt_dir / META_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        loaded = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # pickle refusals, truncated files, old formats
        raise CheckpointError(f"{path} could not be loaded safely: {e}") from e
    if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
        loaded = loaded["model_state_dict"]  # this package's training checkpoints wrap the weights
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} must hold a state dict, got {type(loaded).__name__}")
    state_dict = strip_wrapper_prefixes(loaded)
    if any(".self_attn." in k or k.startswith("embed_tokens.") for k in state_dict):
        raise CheckpointError(f"{path} holds Hugging Face parameter names; load its directory with load_hf_checkpoint")
    check_state_dict(state_dict, args, f"checkpoint {path}")
    return args, state_dict


def save_meta_checkpoint(state_dict: Mapping[str, torch.Tensor], args: ModelArgs, out_dir: str | Path) -> Path:
    """Write params.json + consolidated.00.pth. head_dim / hidden_dim are written only when they differ
    from what Meta's rules derive, so a standard model's params.json stays readable by Meta's code."""
    check_state_dict(state_dict, args, "state dict to save")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = args.to_params()
    if params["head_dim"] == args.dim // args.n_heads:
        params.pop("head_dim")
    if params["hidden_dim"] == ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier):
        params.pop("hidden_dim")
    (out_dir / META_PARAMS).write_text(json.dumps(params, indent=2) + "\n")
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, out_dir / META_WEIGHTS)
    return out_dir


# ----------------------------------------------------------------------------------- Hugging Face

# Meta name <-> HF name. Per-layer names are relative to `layers.{i}.` / `model.layers.{i}.`.
_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_TOP = {v: k for k, v in _HF_TOP.items()}
_META_LAYER = {v: k for k, v in _HF_LAYER.items()}
_HF_DROPPED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old HF buffer


def _rename(name: str, top: dict, layer: dict, src_prefix: str, dst_prefix: str, what: str) -> str:
    if name in top:
        return top[name]
    m = re.fullmatch(rf"{re.escape(src_prefix)}(\d+)\.(.+)", name)
    if m and m.group(2) in layer:
        return f"{dst_prefix}{m.group(1)}.{layer[m.group(2)]}"
    raise KeyError(f"no {what} name for parameter {name!r}")


def meta_to_hf_name(name: str) -> str:
    return _rename(name, _HF_TOP, _HF_LAYER, "layers.", "model.layers.", "Hugging Face")


def hf_to_meta_name(name: str) -> str:
    return _rename(name, _META_TOP, _META_LAYER, "model.layers.", "layers.", "Meta")


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows, per head, from Meta's interleaved pairs (x0, x1), (x2, x3), ... to HF's rotate-half
    order (x0, x2, ..., x1, x3, ...)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_to_hf."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_heads(name: str, args: ModelArgs) -> Optional[int]:
    """Number of heads whose rows a RoPE permutation acts on, or None for other parameters."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """This model's state dict -> LlamaForCausalLM's (names mapped, wq/wk rows permuted)."""
    out = {}
    for name, t in state_dict.items():
        heads = _rope_heads(name, args)
        out[meta_to_hf_name(name)] = permute_to_hf(t, heads) if heads else t
    return out


def from_hf_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], args: ModelArgs, source: str = "Hugging Face state dict"
) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> this model's. Tied embeddings (no lm_head.weight) are copied
    into `output`, so training unties them. Unknown HF names are an error that lists them."""
    out, unknown = {}, []
    for hf_name, t in hf_state_dict.items():
        if _HF_DROPPED.fullmatch(hf_name):
            continue
        try:
            name = hf_to_meta_name(hf_name)
        except KeyError:
            unknown.append(hf_name)
            continue
        heads = _rope_heads(name, args)
        out[name] = permute_from_hf(t, heads) if heads else t
    if unknown:
        raise CheckpointError(f"{source} has {len(unknown)} parameter(s) this model cannot represent: {_short(sorted(unknown))}")
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def args_from_hf_config(config: Mapping, source: str = HF_CONFIG) -> ModelArgs:
    """ModelArgs from a LlamaForCausalLM config.json (transformers 4.x `rope_scaling` + `rope_theta`, or
    5.x `rope_parameters`). Refuses what this model cannot represent."""

    def refuse(why: str):
        raise CheckpointError(f"{source}: {why}")

    if config.get("model_type", "llama") != "llama":
        refuse(f"model_type {config['model_type']!r} is not 'llama'")
    if config.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            refuse(f"{key}=true is not supported (this model's linear layers have no bias)")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in config:
            refuse(f"required key {key!r} is missing")

    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope and not isinstance(rope_type, str):
        refuse(f"per-layer-type RoPE parameters are not supported: {rope}")
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor != 1 is not supported")
    scaling: dict = {"use_scaled_rope": False}
    if rope_type == "llama3":
        for key in ("factor", "high_freq_factor"):
            if key not in rope:
                refuse(f"llama3 RoPE scaling needs {key!r}: {rope}")
        if float(rope.get("low_freq_factor", LLAMA3_LOW_FREQ_FACTOR)) != LLAMA3_LOW_FREQ_FACTOR:
            refuse(f"llama3 RoPE low_freq_factor must be 1, got {rope['low_freq_factor']!r}")
        original = rope.get("original_max_position_embeddings", LLAMA3_ORIGINAL_CONTEXT)
        if int(original) != LLAMA3_ORIGINAL_CONTEXT:
            refuse(f"llama3 RoPE original_max_position_embeddings must be 8192, got {original!r}")
        scaling = dict(
            use_scaled_rope=True,
            rope_scale_factor=float(rope["factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
        )
    elif rope_type != "default":
        refuse(f"RoPE type {rope_type!r} is not supported (only 'default' and 'llama3')")

    n_heads = config["num_attention_heads"]
    try:
        return ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"],
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),  # HF's defaults for absent keys
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            max_seq_len=config.get("max_position_embeddings", 2048),
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            hidden_dim=config["intermediate_size"],
            **scaling,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_config(args: ModelArgs, dtype: Optional[torch.dtype] = None, tokenizer=None) -> dict:
    """A LlamaForCausalLM config.json dict for `args` (readable by transformers 4.x and 5.x); bos / eos ids
    from `tokenizer` when given, else Llama 3's for a 128,256 vocabulary."""
    llama3_vocab = args.vocab_size == 128256
    bos, eos = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer is not None else (
        (128000, 128001) if llama3_vocab else (None, None))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": args.rope_scale_factor,
            "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT,
        }
        if args.use_scaled_rope
        else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,  # this model stores `output` separately
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
    }


def _read_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return load_file(path, device=str(device))
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as safetensors: {e}") from e


def load_hf_checkpoint(hf_dir: str | Path, device="cpu") -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(args, state dict in this model's names and RoPE layout) from a Hugging Face directory:
    config.json + model.safetensors, or the shards named in model.safetensors.index.json."""
    hf_dir = Path(hf_dir)
    args = args_from_hf_config(_read_json(hf_dir / HF_CONFIG), str(hf_dir / HF_CONFIG))
    index_path = hf_dir / HF_INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no 'weight_map'")
        hf_sd: dict[str, torch.Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            if Path(fname).name != fname:
                raise CheckpointError(f"{index_path} names a file outside the directory: {fname!r}")
            hf_sd.update(_read_safetensors(hf_dir / fname, device))
        absent = sorted(set(weight_map) - set(hf_sd))
        if absent:
            raise CheckpointError(f"{index_path} lists tensors its shards do not hold: {_short(absent)}")
        source = f"checkpoint {hf_dir} (sharded)"
    elif (hf_dir / HF_WEIGHTS).is_file():
        hf_sd = _read_safetensors(hf_dir / HF_WEIGHTS, device)
        source = f"checkpoint {hf_dir / HF_WEIGHTS}"
    else:
        raise CheckpointError(f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_INDEX} (only safetensors are read)")
    state_dict = from_hf_state_dict(hf_sd, args, source)
    check_state_dict(state_dict, args, source)
    return args, state_dict


def export_hf(
    state_dict: Mapping[str, torch.Tensor], args: ModelArgs, out_dir: str | Path, dtype: Optional[torch.dtype] = None,
    tokenizer=None,
) -> Path:
    """Write config.json + model.safetensors so `LlamaForCausalLM.from_pretrained(out_dir)` loads this
    model. `dtype` None keeps the stored dtype. With `tokenizer` (the run's), also its tokenizer.json and
    tokenizer_config.json (`data.tokenizer.save_hf_tokenizer`: `AutoTokenizer.from_pretrained(out_dir)`
    works) and a generation_config.json whose eos ids are its stop tokens (<|eot_id|> ends a chat turn)."""
    from safetensors.torch import save_file

    check_state_dict(state_dict, args, "state dict to export")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for name, t in to_hf_state_dict(state_dict, args).items():
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    stored = dtype or next(iter(tensors.values())).dtype
    (out_dir / HF_CONFIG).write_text(json.dumps(hf_config(args, stored, tokenizer), indent=2) + "\n")
    save_file(tensors, str(out_dir / HF_WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        from fedtp_flwr.data.tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer, out_dir)
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_tokens),
                      "pad_token_id": tokenizer.pad_id}
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir


# ---------------------------------------------------------------------------------- either format


def load_checkpoint(ckpt_dir: str | Path, device="cpu") -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Meta directory (params.json) or Hugging Face directory (config.json), detected by its files."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / META_PARAMS).is_file():
        return load_meta_checkpoint(ckpt_dir, device)
    if (ckpt_dir / HF_CONFIG).is_file():
        return load_hf_checkpoint(ckpt_dir, device)
    raise CheckpointError(
        f"{ckpt_dir} is neither a Meta checkpoint ({META_PARAMS} + {META_WEIGHTS}) nor a Hugging Face one "
        f"({HF_CONFIG} + {HF_WEIGHTS})"
    )


def load_model(ckpt_dir: str | Path, device="cpu", dtype: Optional[torch.dtype] = torch.float32) -> Transformer:
    """A Transformer holding a checkpoint's weights, on `device` in `dtype` (None: as stored).
    Built on the meta device, so the weights are materialised once."""
    args, state_dict = load_checkpoint(ckpt_dir, device)
    with torch.device("meta"):
        model = Transformer(args)
    # .to() may return the loaded (possibly memory-mapped, copy-on-write) tensor itself: no second copy.
    model.load_state_dict({k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state_dict.items()},
                          strict=True, assign=True)
    return model
