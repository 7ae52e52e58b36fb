"""The model: its invariants, the 3B shapes from the seed's table, and logits against Hugging Face."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedtp_flwr.model.checkpoint import hf_config, to_hf_state_dict
from fedtp_flwr.model.sharding import is_split, split_fraction
from fedtp_flwr.model.transformer import (
    ModelArgs,
    Transformer,
    build_model,
    count_parameters,
    ffn_hidden_dim,
    preset_args,
    rope_frequencies,
)

transformers = pytest.importorskip("transformers")

# Two tiny configs that exercise what the 3B model has: GQA with groups of 4 (n_kv_heads < n_heads / 2)
# and a non-default FFN width (ffn_dim_multiplier != 1); both with Llama 3 RoPE scaling, factor 32.
# rope_theta is small so the scaled low frequencies turn through visible angles in a short sequence.
TINY_GQA = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, multiple_of=16,
                rope_theta=10000.0, use_scaled_rope=True, max_seq_len=16384)
TINY_FFN = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=83, multiple_of=8,
                ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=10000.0, use_scaled_rope=True,
                max_seq_len=16384)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights at a scale where every part matters (attention scores O(1), not ~0): fan-in normal for
    matrices, unit normal for embeddings, 1 + noise for norm weights."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1:
            p.copy_(1 + 0.1 * noise)
        elif "embed" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[1]))


# ------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(dim=0), "dim"),
        (dict(n_layers=-2), "n_layers"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(n_heads=6, n_kv_heads=4), "n_kv_heads=4"),
        (dict(dim=66, n_heads=4), "dim=66"),
        (dict(head_dim=7), "head_dim=7"),
        (dict(head_dim=0), "head_dim"),
        (dict(hidden_dim=-3), "-3"),
        (dict(ffn_dim_multiplier=0.0), "ffn_dim_multiplier"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(rope_scale_factor=0.0), "rope_scale_factor"),
        (dict(rope_high_freq_factor=1.0), "rope_high_freq_factor"),
    ],
)
def test_model_args_refuse_bad_values_naming_them(overrides, named):
    with pytest.raises(ValueError, match=named):
        ModelArgs(**{**TINY_GQA, **overrides})


def test_from_params_refuses_unknown_keys():
    with pytest.raises(ValueError, match="n_experts"):
        ModelArgs.from_params({**TINY_GQA, "n_experts": 8})


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="llama3.2-3b"):
        preset_args("llama3.2-7b")


# ------------------------------------------------------------------------------------------ 3B


# The seed's "Model Layers and Shapes" table for Llama 3.2 3B: layer 0's rows repeat for layers 0..27.
SEED_TOP_SHAPES = {
    "tok_embeddings.weight": (128256, 3072),
    "norm.weight": (3072,),
    "output.weight": (128256, 3072),
}
SEED_LAYER_SHAPES = {
    "attention.wq.weight": (3072, 3072),
    "attention.wk.weight": (1024, 3072),
    "attention.wv.weight": (1024, 3072),
    "attention.wo.weight": (3072, 3072),
    "feed_forward.w1.weight": (8192, 3072),
    "feed_forward.w2.weight": (3072, 8192),
    "feed_forward.w3.weight": (8192, 3072),
    "attention_norm.weight": (3072,),
    "ffn_norm.weight": (3072,),
}
SEED_N_LAYERS = 28


@pytest.fixture(scope="module")
def meta_3b():
    with torch.device("meta"):
        return Transformer(preset_args("llama3.2-3b"))


def test_3b_state_dict_shapes_equal_the_seed_table(meta_3b):
    expected = dict(SEED_TOP_SHAPES)
    for i in range(SEED_N_LAYERS):
        expected.update({f"layers.{i}.{k}": v for k, v in SEED_LAYER_SHAPES.items()})
    actual = {k: tuple(v.shape) for k, v in meta_3b.state_dict().items()}
    assert len(actual) == 3 + 9 * SEED_N_LAYERS
    assert actual == expected


def test_3b_parameter_count_and_fractions(meta_3b):
    sd = meta_3b.state_dict()
    total = count_parameters(meta_3b)
    assert total == 3_606_752_256
    attention = sum(t.numel() for k, t in sd.items() if ".attention." in k)
    ffn = sum(t.numel() for k, t in sd.items() if ".feed_forward." in k)
    embeddings = sd["tok_embeddings.weight"].numel() + sd["output.weight"].numel()
    assert round(100 * attention / total, 2) == 19.54
    assert round(100 * ffn / total, 2) == 58.61
    assert round(100 * embeddings / total, 2) == 21.85
    assert sum(t.numel() for k, t in sd.items() if is_split(k)) == attention + ffn
    assert round(100 * split_fraction(preset_args("llama3.2-3b")), 2) == 78.15


@pytest.mark.parametrize("name, params, hidden", [("llama3.1-8b", 8_030_261_248, 14336),
                                                   ("llama3.1-70b", 70_553_706_496, 28672)])
def test_llama31_presets_have_metas_parameter_counts(name, params, hidden):
    # Meta's published counts; the FFN width comes from ffn_dim_multiplier 1.3 and multiple_of (1024 / 4096)
    args = preset_args(name)
    with torch.device("meta"):
        sd = Transformer(args).state_dict()
    assert (args.hidden_dim, sum(t.numel() for t in sd.values())) == (hidden, params)


def test_3b_on_meta_allocates_nothing(meta_3b):
    assert all(p.is_meta for p in meta_3b.parameters())
    assert all(b.is_meta for b in meta_3b.buffers())


# --------------------------------------------------------------------------- parity with HF Llama


def hf_twin(model: Transformer):
    """transformers' LlamaForCausalLM holding `model`'s weights (converted in memory)."""
    config = transformers.LlamaConfig.from_dict(hf_config(model.args))
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.args), strict=True)
    return hf


def test_tiny_configs_cover_gqa_groups_and_ffn_multiplier():
    gqa, ffn = ModelArgs(**TINY_GQA), ModelArgs(**TINY_FFN)
    assert gqa.n_kv_heads < gqa.n_heads / 2
    assert ffn.hidden_dim != ffn_hidden_dim(ffn.dim, ffn.multiple_of, None)


@pytest.mark.parametrize("params", [TINY_GQA, TINY_FFN], ids=["gqa-groups-of-4", "ffn-multiplier-1.3"])
def test_logits_equal_hf_llama(params):
    args = ModelArgs(**params)
    model = build_model(args, seed=None)
    randomize(model, seed=1)
    model.eval()
    hf = hf_twin(model)
    # Llama 3 RoPE scaling (factor 32) computed the same way by both.
    assert hf.config.rope_parameters["rope_type"] == "llama3" and hf.config.rope_parameters["factor"] == 32.0
    torch.testing.assert_close(rope_frequencies(args), hf.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)

    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < 2e-4
    # Guard: logits are not near-constant, and HF without the RoPE row permutation gives other logits
    # (so the check above would notice a wrong layout).
    assert ours.std().item() > 0.5
    unpermuted = {k: v for k, v in hf.state_dict().items()}
    for i, layer in enumerate(model.layers):
        unpermuted[f"model.layers.{i}.self_attn.q_proj.weight"] = layer.attention.wq.weight
        unpermuted[f"model.layers.{i}.self_attn.k_proj.weight"] = layer.attention.wk.weight
    hf.load_state_dict(unpermuted)
    with torch.no_grad():
        assert (hf(tokens).logits - ours).abs().max().item() > 1e-2


# --------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_gives_same_loss_and_grads():
    args = ModelArgs(**TINY_GQA)
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    results = []
    for checkpointing in (False, True):
        model = build_model(args, seed=None)
        randomize(model, seed=4)
        model.gradient_checkpointing = checkpointing
        calls = []
        model.layers[0].attention.wq.register_forward_hook(lambda *_: calls.append(1))
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        # Guard: with checkpointing the block really is recomputed during backward.
        assert len(calls) == (2 if checkpointing else 1)
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys() and all(g is not None for g in grads0.values())
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-7, msg=k)
