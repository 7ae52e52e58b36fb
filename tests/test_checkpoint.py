"""Checkpoints: Meta's format round trip with legacy names, clear errors, and Hugging Face in and out."""

import json
import math

import pytest
import torch

from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.model.checkpoint import (
    CheckpointError,
    export_hf,
    load_checkpoint,
    load_hf_checkpoint,
    load_meta_checkpoint,
    load_model,
    save_meta_checkpoint,
)

transformers = pytest.importorskip("transformers")

ARGS = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=71, multiple_of=8,
                 ffn_dim_multiplier=1.3, rope_theta=10000.0, use_scaled_rope=True, max_seq_len=16384)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fan-in normal matrices, unit-normal embeddings, 1 + noise norms: every weight shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if p.ndim == 1 else noise if "embed" in name else noise / math.sqrt(p.shape[1]))
    return model.eval()


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.std().item() > 0.5  # guard: not near-constant logits
    assert (a - b).abs().max().item() < 2e-4


@pytest.fixture
def model():
    return randomize(build_model(ARGS, seed=None), seed=1)


def write_meta(ckpt_dir, state_dict, params=None):
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(params if params is not None else {
        "dim": ARGS.dim, "n_layers": ARGS.n_layers, "n_heads": ARGS.n_heads, "n_kv_heads": ARGS.n_kv_heads,
        "vocab_size": ARGS.vocab_size, "multiple_of": ARGS.multiple_of,
        "ffn_dim_multiplier": ARGS.ffn_dim_multiplier, "norm_eps": ARGS.norm_eps, "rope_theta": ARGS.rope_theta,
        "use_scaled_rope": True, "max_seq_len": ARGS.max_seq_len,
    }))
    torch.save(state_dict, ckpt_dir / "consolidated.00.pth")
    return ckpt_dir


# ------------------------------------------------------------------------------------------- Meta


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "model."])
def test_meta_round_trip_maps_legacy_names(model, tmp_path, prefix):
    """Wrapper prefixes (DDP, torch.compile, a wrapping module) are stripped and a stored rope.freqs
    buffer is dropped."""
    sd = model.state_dict()
    legacy = {f"{prefix}{k}": v for k, v in sd.items()}
    legacy[f"{prefix}rope.freqs"] = torch.randn(ARGS.head_dim // 2)
    write_meta(tmp_path / "ckpt", legacy)

    args, loaded = load_meta_checkpoint(tmp_path / "ckpt")
    assert args == ARGS
    assert list(loaded) == list(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert_same_logits(logits(load_model(tmp_path / "ckpt")), logits(model))


def test_save_meta_checkpoint_round_trip(model, tmp_path):
    save_meta_checkpoint(model.state_dict(), ARGS, tmp_path / "ckpt")
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    assert "head_dim" not in params and "hidden_dim" not in params  # derivable, so left to Meta's rules
    args, loaded = load_checkpoint(tmp_path / "ckpt")
    assert args == ARGS and all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_meta_wrong_shape_names_key_shapes_and_path(model, tmp_path):
    sd = dict(model.state_dict())
    sd["layers.1.attention.wk.weight"] = torch.zeros(8, ARGS.dim)
    ckpt = write_meta(tmp_path / "ckpt", sd)
    with pytest.raises(CheckpointError) as err:
        load_meta_checkpoint(ckpt)
    msg = str(err.value)
    assert "layers.1.attention.wk.weight" in msg and "(8, 48)" in msg and "(24, 48)" in msg
    assert str(ckpt / "consolidated.00.pth") in msg


def test_meta_missing_key_is_named(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["layers.0.ffn_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 key.*layers\.0\.ffn_norm\.weight"):
        load_meta_checkpoint(write_meta(tmp_path / "ckpt", sd))


def test_meta_unexpected_key_is_named(model, tmp_path):
    sd = dict(model.state_dict())
    sd["layers.0.attention.wq.bias"] = torch.zeros(ARGS.dim)
    with pytest.raises(CheckpointError, match=r"unexpected key.*layers\.0\.attention\.wq\.bias"):
        load_meta_checkpoint(write_meta(tmp_path / "ckpt", sd))


def test_meta_bad_params_json_names_the_file(model, tmp_path):
    ckpt = write_meta(tmp_path / "ckpt", model.state_dict())
    (ckpt / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"params\.json is not valid JSON"):
        load_meta_checkpoint(ckpt)
    (ckpt / "params.json").write_text(json.dumps({"dim": 48, "n_layers": 2, "moe_experts": 4}))
    with pytest.raises(CheckpointError, match=r"params\.json.*moe_experts"):
        load_meta_checkpoint(ckpt)


class NotATensor:  # a pickled class: weights_only loading must refuse it
    pass


def test_meta_loading_refuses_arbitrary_pickles(model, tmp_path):
    sd = dict(model.state_dict())
    ckpt = write_meta(tmp_path / "ckpt", {**sd, "extra": NotATensor()})
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_meta_checkpoint(ckpt)


# ----------------------------------------------------------------------------------- Hugging Face


def test_export_hf_loads_in_transformers_with_same_logits(model, tmp_path):
    export_hf(model.state_dict(), ARGS, tmp_path / "hf", dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3" and hf.config.rope_parameters["factor"] == 32.0
    assert hf.config.intermediate_size == ARGS.hidden_dim and hf.config.num_key_value_heads == ARGS.n_kv_heads
    assert_same_logits(logits(hf), logits(model))


def test_export_then_import_is_bit_exact(model, tmp_path):
    """The RoPE row permutation and its inverse lose nothing."""
    export_hf(model.state_dict(), ARGS, tmp_path / "hf")
    args, loaded = load_hf_checkpoint(tmp_path / "hf")
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "head_dim", "hidden_dim", "norm_eps",
                  "rope_theta", "use_scaled_rope", "rope_scale_factor", "rope_high_freq_factor", "max_seq_len"):
        assert getattr(args, field) == getattr(ARGS, field), field
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def hf_llama(tied: bool) -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(
        vocab_size=67, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=tied,
    )
    return randomize(transformers.LlamaForCausalLM(config), seed=3)


@pytest.mark.parametrize("tied, shard_size", [(False, None), (True, None), (False, "20KB")],
                         ids=["untied", "tied", "sharded"])
def test_hf_import_gives_same_logits(tied, shard_size, tmp_path):
    hf = hf_llama(tied)
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard_size} if shard_size else {}))
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert ("model.safetensors.index.json" in files) == bool(shard_size)

    args, sd = load_hf_checkpoint(tmp_path / "hf")
    assert (args.n_heads, args.n_kv_heads, args.hidden_dim, args.rope_scale_factor) == (8, 2, 96, 32.0)
    assert args.use_scaled_rope and args.max_seq_len == 16384
    if tied:  # output is a copy of the embeddings, so training unties them
        assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
        assert sd["output.weight"].data_ptr() != sd["tok_embeddings.weight"].data_ptr()
    tokens = TOKENS.clamp(max=args.vocab_size - 1)
    assert_same_logits(logits(load_model(tmp_path / "hf"), tokens), logits(hf, tokens))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
        ({"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0, "rope_theta": 1e4}}, "low_freq_factor"),
        ({"rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096, "rope_theta": 1e4}},
         "original_max_position_embeddings"),
        ({"model_type": "mistral"}, "mistral"),
    ],
)
def test_hf_import_refuses_what_the_model_cannot_represent(change, message, tmp_path):
    hf_llama(tied=False).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as err:
        load_hf_checkpoint(tmp_path / "hf")
    assert "config.json" in str(err.value)


def test_hf_import_reads_legacy_rope_scaling(tmp_path):
    """transformers 4.x configs (as on the Hub for Llama 3.2) keep rope_theta and rope_scaling apart."""
    hf_llama(tied=False).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=10000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    args, _ = load_hf_checkpoint(tmp_path / "hf")
    assert (args.use_scaled_rope, args.rope_scale_factor, args.rope_theta) == (True, 8.0, 10000.0)


def test_unknown_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="neither a Meta checkpoint"):
        load_checkpoint(tmp_path)
