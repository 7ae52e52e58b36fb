"""Local training and evaluation on a tiny CPU model, checked against hand computations and torch.optim.AdamW."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_steps

from fedtp_flwr.data import IGNORE_INDEX, token_loss
from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.model.sharding import shard, shard_args
from fedtp_flwr.training import (
    TrainSettings,
    add_proximal_grad,
    evaluate,
    lr_at,
    make_optimizer,
    param_groups,
    resolve_device,
    train_local,
)

VOCAB = 64
PAD = 0


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, max_seq_len=64)
    return ModelArgs(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides):
    return build_model(tiny_args(**overrides), seed=seed)


def make_batch(lengths: list[int], T: int, gen: torch.Generator, learnable: bool = False):
    """Sequences of `lengths` real tokens, right-padded with PAD to T + 1, then split into
    (inputs, targets) with targets = inputs shifted by one and IGNORE_INDEX where the target is padding.
    learnable: each sequence counts up by one (mod VOCAB, skipping PAD) from a random start."""
    B = len(lengths)
    if learnable:
        start = torch.randint(1, VOCAB, (B, 1), generator=gen)
        seq = (start - 1 + torch.arange(T + 1)) % (VOCAB - 1) + 1
    else:
        seq = torch.randint(1, VOCAB, (B, T + 1), generator=gen)
    for i, n in enumerate(lengths):
        seq[i, n:] = PAD
    inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    for i, n in enumerate(lengths):
        targets[i, max(n - 1, 0):] = IGNORE_INDEX
    return inputs, targets


def endless(batch_list):
    while True:
        yield from batch_list


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def settings(**kw) -> TrainSettings:
    base = dict(learning_rate=1e-3, local_steps=1, max_grad_norm=0.0, weight_decay=0.01)
    return TrainSettings(**{**base, **kw})


def reference_adamw(model, s: TrainSettings):
    """torch.optim.AdamW, default implementation, with the groups written out by hand."""
    decay = [p for n, p in model.named_parameters() if n.endswith(("wq.weight", "wk.weight", "wv.weight",
             "wo.weight", "w1.weight", "w2.weight", "w3.weight")) or n == "output.weight"]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.learning_rate, betas=s.betas, eps=s.eps, foreach=False,
    )


# ------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "field, value",
    [("precision", "fp16"), ("lr_schedule", "linear"), ("learning_rate", 0.0), ("local_steps", 0),
     ("grad_accum_steps", 1.5), ("device", "tpu"), ("betas", (0.9, 1.0)), ("proximal_mu", -1.0),
     ("max_grad_norm", -1.0), ("warmup_steps", -1), ("progress", "yes")],
)
def test_invalid_setting_is_refused_with_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        TrainSettings(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value) and "allowed" in str(err.value)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ----------------------------------------------------------------------------------------- optimizer


def test_param_groups_decay_linear_weights_only():
    model = tiny_model()
    groups = {g["weight_decay"]: set(g["names"]) for g in param_groups(model, 0.1)}
    linear = {n for n in dict(model.named_parameters()) if n.split(".")[-2] in
              ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")}
    assert groups[0.1] == linear and "output.weight" in linear
    assert groups[0.0] == {"tok_embeddings.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")}


def test_train_local_step_equals_manual_step_with_reference_adamw():
    """One train_local step (grad clipping off) == forward, token-mean CE, backward, torch AdamW step."""
    gen = torch.Generator().manual_seed(0)
    batch = make_batch([9, 5, 9], T=8, gen=gen)
    s = settings(weight_decay=0.1)
    model, ref = tiny_model(), tiny_model()
    start = weights(model)
    train_local(model, endless([batch]), s)

    opt = reference_adamw(ref, s)
    logits = ref(batch[0])
    loss = F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    opt.step()
    assert_same_steps(model.state_dict(), ref.state_dict(), start, s.learning_rate)
    assert not torch.equal(model.output.weight, tiny_model().output.weight)  # not vacuous: it moved


def test_grad_clipping_matches_clip_grad_norm():
    """The clipped step equals torch's clip_grad_norm_ then AdamW, within float32 rounding (conftest.step_tolerance);
    an unclipped step is far outside that tolerance, so the comparison sees the clipping."""
    gen = torch.Generator().manual_seed(1)
    batch = make_batch([9, 9], T=8, gen=gen)
    s = settings(max_grad_norm=0.05, learning_rate=1e-2)
    model, ref, unclipped = tiny_model(), tiny_model(), tiny_model()
    start = weights(model)
    train_local(model, endless([batch]), s)
    opt = reference_adamw(ref, s)
    F.cross_entropy(ref(batch[0]).flatten(0, 1), batch[1].flatten(), ignore_index=IGNORE_INDEX).backward()
    assert torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05) > 0.05  # clipping really happens
    opt.step()
    assert_same_steps(model.state_dict(), ref.state_dict(), start, s.learning_rate)
    train_local(unclipped, endless([batch]), settings(learning_rate=1e-2))
    with pytest.raises(AssertionError, match="float32 step tolerance"):
        assert_same_steps(unclipped.state_dict(), ref.state_dict(), start, s.learning_rate)


# ------------------------------------------------------------------------------------------------ loss


def test_evaluate_equals_hand_computed_loss_and_ignores_padding():
    gen = torch.Generator().manual_seed(2)
    inputs, targets = make_batch([7, 3, 5], T=6, gen=gen)
    model = tiny_model()
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs).double(), dim=-1)
    terms = [-logp[b, t, targets[b, t]].item() for b in range(3) for t in range(6) if targets[b, t] != IGNORE_INDEX]
    assert len(terms) == 6 + 2 + 4
    hand = sum(terms) / len(terms)

    model.train()
    out = evaluate(model, [(inputs, targets)])
    assert model.training  # mode restored
    assert out["num_tokens"] == len(terms)
    assert out["loss"] == pytest.approx(hand, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)

    # more right padding, and other token ids at padded positions, do not change the loss
    longer_in = torch.cat([inputs, torch.full((3, 4), PAD)], dim=1)
    longer_tg = torch.cat([targets, torch.full((3, 4), IGNORE_INDEX)], dim=1)
    longer_in[1, 3:] = torch.randint(1, VOCAB, (7,), generator=gen)
    assert evaluate(model, [(longer_in, longer_tg)])["loss"] == pytest.approx(hand, rel=1e-6)

    # token weighting across batches: two batches give the loss of their concatenation
    split = evaluate(model, [(inputs[:1], targets[:1]), (inputs[1:], targets[1:])])
    assert split["loss"] == pytest.approx(hand, rel=1e-6) and split["num_tokens"] == len(terms)

    s, n = token_loss(model(inputs), targets)
    assert s.dtype == torch.float32 and n == len(terms) and s.item() / n == pytest.approx(hand, rel=1e-5)


def test_evaluate_refuses_batches_without_tokens():
    inputs, targets = make_batch([1, 1], T=4, gen=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate(tiny_model(), [(inputs, targets)])


# ---------------------------------------------------------------------------------------- determinism


def _dropout_hook(module, args, output):
    return F.dropout(output, p=0.2, training=True)  # a stochastic layer, so the seed matters


def test_same_seed_same_weights_different_seed_different():
    gen = torch.Generator().manual_seed(3)
    batches = [make_batch([9, 6], T=8, gen=gen) for _ in range(3)]

    def run(seed):
        model = tiny_model()
        model.tok_embeddings.register_forward_hook(_dropout_hook)
        metrics = train_local(model, endless(batches), settings(local_steps=3, seed=seed))
        return weights(model), metrics

    caller_rng = torch.get_rng_state()
    (w1, m1), (w2, m2), (w3, _) = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), caller_rng)  # the caller's RNG is left alone
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and m1["train_loss"] == m2["train_loss"]
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)


# ------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("lengths", [([9, 9], [9, 9]), ([9, 4], [3, 8])], ids=["equal-tokens", "unequal-padding"])
def test_grad_accumulation_equals_one_big_batch(lengths):
    """accum 2 over micro-batches b1, b2 == one step on cat(b1, b2): each micro-batch's sum of NLL is
    divided by the token count of the whole step, so this holds even when the padding differs."""
    gen = torch.Generator().manual_seed(4)
    b1, b2 = make_batch(lengths[0], T=8, gen=gen), make_batch(lengths[1], T=8, gen=gen)
    big = (torch.cat([b1[0], b2[0]]), torch.cat([b1[1], b2[1]]))
    accum, whole = tiny_model(), tiny_model()
    m_acc = train_local(accum, iter([b1, b2]), settings(grad_accum_steps=2, max_grad_norm=1.0))
    m_big = train_local(whole, iter([big]), settings(max_grad_norm=1.0))
    for name, w in whole.state_dict().items():
        torch.testing.assert_close(accum.state_dict()[name], w, rtol=0, atol=1e-6, msg=name)
    assert m_acc["train_loss"] == pytest.approx(m_big["train_loss"], rel=1e-6)
    assert m_acc["num_tokens"] == m_big["num_tokens"] == sum(n - 1 for n in lengths[0] + lengths[1])
    assert m_acc["num_examples"] == m_big["num_examples"] == 4 and m_acc["steps"] == 1


# --------------------------------------------------------------------------------------------- FedProx


def test_proximal_gradient_is_mu_times_distance():
    model = tiny_model()
    ref = {n: p.detach() + 0.5 for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    pairs = [(p, ref[n]) for n, p in model.named_parameters()]
    add_proximal_grad(pairs, mu=0.3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 1.0 - 0.3 * 0.5))


def test_proximal_step_equals_manual_loss_plus_prox_term():
    """mu > 0: the step equals AdamW on grad(CE) + mu * (w - w_ref), as autograd computes it from
    CE + mu/2 * sum ||w - w_ref||^2 over the reference's parameters."""
    gen = torch.Generator().manual_seed(5)
    batch = make_batch([9, 7], T=8, gen=gen)
    mu = 0.5
    model, ref_model = tiny_model(), tiny_model()
    reference = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=gen)
                 for n, p in model.named_parameters() if n.startswith("layers.0.")}
    s = settings(proximal_mu=mu)
    start = weights(model)
    train_local(model, endless([batch]), s, prox_reference=reference)

    opt = reference_adamw(ref_model, s)
    params = dict(ref_model.named_parameters())
    loss = F.cross_entropy(ref_model(batch[0]).flatten(0, 1), batch[1].flatten(), ignore_index=IGNORE_INDEX)
    prox = sum(((params[n] - r) ** 2).sum() for n, r in reference.items())
    (loss + mu / 2 * prox).backward()
    opt.step()
    assert_same_steps(model.state_dict(), ref_model.state_dict(), start, s.learning_rate)

    plain = tiny_model()
    train_local(plain, endless([batch]), settings())
    assert not torch.equal(plain.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)


def test_proximal_reference_equal_to_weights_first_step_equals_mu_zero():
    gen = torch.Generator().manual_seed(6)
    batch = make_batch([9, 5], T=8, gen=gen)
    with_ref, default_ref, plain = tiny_model(), tiny_model(), tiny_model()
    train_local(with_ref, endless([batch]), settings(proximal_mu=1.0), prox_reference=weights(with_ref))
    train_local(default_ref, endless([batch]), settings(proximal_mu=1.0))  # defaults to the start weights
    train_local(plain, endless([batch]), settings(proximal_mu=0.0))
    for name, w in plain.state_dict().items():
        assert torch.equal(with_ref.state_dict()[name], w) and torch.equal(default_ref.state_dict()[name], w)


def test_proximal_reference_with_unknown_name_is_refused():
    batch = make_batch([9], T=8, gen=torch.Generator().manual_seed(0))
    with pytest.raises(KeyError, match="not parameters"):
        train_local(tiny_model(), endless([batch]), settings(proximal_mu=0.1),
                    prox_reference={"nope": torch.zeros(1)})


def test_proximal_reference_aliasing_the_weights_is_refused():
    """A state_dict() view moves with the weights, so w - w_ref would stay 0: refuse it, ask for a copy."""
    model = tiny_model()
    batch = make_batch([9], T=8, gen=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shares memory"):
        train_local(model, endless([batch]), settings(proximal_mu=0.1), prox_reference=model.state_dict())


# --------------------------------------------------------------------------------------------- schedule


def test_cosine_schedule_with_warmup():
    s = TrainSettings(learning_rate=1.0, lr_schedule="cosine", warmup_steps=2, local_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(0.5) and lr_at(1, s) == pytest.approx(1.0)
    assert lr_at(2, s) == pytest.approx(1.0)  # end of warmup: the peak
    assert lr_at(6, s) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 8 decay steps
    assert lr_at(4, s) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(9, s) > 0.1 and lr_at(10, s) == pytest.approx(0.1) and lr_at(50, s) == pytest.approx(0.1)
    to_zero = TrainSettings(learning_rate=1.0, lr_schedule="cosine", local_steps=4, min_lr_ratio=0.0)
    assert [lr_at(i, to_zero) for i in range(5)] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                                                    0.5 - 0.5 * math.cos(math.pi / 4), 0.0])
    values = [lr_at(i, s) for i in range(2, 11)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_schedule_with_warmup_and_train_local_applies_it():
    s = TrainSettings(learning_rate=0.4, warmup_steps=4, local_steps=6)
    assert [lr_at(i, s) for i in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert lr_at(3, TrainSettings(learning_rate=0.4)) == 0.4

    batch = make_batch([9], T=8, gen=torch.Generator().manual_seed(0))
    model = tiny_model()
    s = settings(lr_schedule="cosine", local_steps=3, learning_rate=1e-3)
    opt = make_optimizer(model, s)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    train_local(model, endless([batch]), s, optimizer=opt)
    assert seen == pytest.approx([lr_at(i, s) for i in range(3)]) and seen[0] > seen[1] > seen[2]


# ------------------------------------------------------------------------------ frozen params, slices


def test_frozen_parameters_do_not_change_and_are_not_optimised():
    gen = torch.Generator().manual_seed(7)
    batch = make_batch([9, 6], T=8, gen=gen)
    model = tiny_model()
    frozen = {n for n in dict(model.named_parameters()) if n.startswith(("tok_embeddings", "layers.0."))}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = weights(model)
    names = {n for g in param_groups(model, 0.01) for n in g["names"]}
    assert names.isdisjoint(frozen) and names
    train_local(model, endless([batch]), settings(local_steps=2, max_grad_norm=1.0))
    after = weights(model)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in after if n not in frozen and "norm" not in n)


def test_trainable_subset_optimiser():
    model = tiny_model()
    opt = make_optimizer(model, settings(), trainable={"output.weight", "norm.weight"})
    assert {n for g in opt.param_groups for n in g["names"]} == {"output.weight", "norm.weight"}
    with pytest.raises(ValueError, match="not parameters"):
        make_optimizer(model, settings(), trainable={"nope"})


def test_tensor_parallel_slice_trains_and_evaluates():
    args = tiny_args()
    full = build_model(args, seed=0)
    sub = build_model(shard_args(args, 2), seed=None)
    sub.load_state_dict(shard(full.state_dict(), args, rank=1, world_size=2))
    gen = torch.Generator().manual_seed(8)
    batches = [make_batch([9, 9, 5, 9], T=8, gen=gen, learnable=True) for _ in range(2)]
    before = evaluate(sub, batches)["loss"]
    metrics = train_local(sub, endless(batches), settings(local_steps=10, learning_rate=3e-3))
    assert metrics["steps"] == 10 and metrics["num_examples"] == 40
    assert evaluate(sub, batches)["loss"] < before


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_and_gradient_checkpointing_give_the_same_step():
    gen = torch.Generator().manual_seed(9)
    batches = [make_batch([9, 4], T=8, gen=gen), make_batch([9, 9], T=8, gen=gen)]
    plain, ckpt = tiny_model(), tiny_model()
    start = weights(plain)
    plain.eval()
    m = train_local(plain, endless(batches), settings(local_steps=2))
    assert not plain.training  # the caller's mode is restored
    mc = train_local(ckpt, endless(batches), settings(local_steps=2, gradient_checkpointing=True))
    assert ckpt.gradient_checkpointing is False  # restored
    assert_same_steps(ckpt.state_dict(), plain.state_dict(), start, settings().learning_rate, steps=2)
    assert m["num_tokens"] == 8 + 3 + 8 + 8 and m["num_examples"] == 4 and m["steps"] == 2
    assert m["train_perplexity"] == pytest.approx(math.exp(m["train_loss"]))
    assert m["tokens_per_second"] == pytest.approx(m["num_tokens"] / m["seconds"])
    assert mc["train_loss"] == pytest.approx(m["train_loss"], rel=1e-6)
    assert all(p.grad is None for p in plain.parameters())  # no gradient memory left behind


def test_non_finite_loss_names_the_step_and_leaves_weights():
    gen = torch.Generator().manual_seed(10)
    batch = make_batch([9], T=8, gen=gen)
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    before = weights(model)
    with pytest.raises(FloatingPointError, match=r"local step 1/2"):
        train_local(model, endless([batch]), settings(local_steps=2))
    assert all(torch.equal(before[k], v) or torch.isnan(v).any() for k, v in weights(model).items())
    assert torch.equal(before["output.weight"], model.output.weight)


def test_running_out_of_batches_is_a_clear_error():
    batch = make_batch([9], T=8, gen=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="ran out after 3 micro-batches.*needs .* = 4"):
        train_local(tiny_model(), iter([batch] * 3), settings(local_steps=2, grad_accum_steps=2))


def test_bf16_autocast_on_cpu_runs_close_to_fp32():
    batch = make_batch([9, 9], T=8, gen=torch.Generator().manual_seed(11))
    model = tiny_model()
    fp32 = evaluate(model, [batch], precision="fp32")["loss"]
    bf16 = evaluate(model, [batch], precision="bf16")["loss"]
    assert bf16 == pytest.approx(fp32, abs=0.05)
    m = train_local(model, endless([batch]), settings(precision="bf16", local_steps=2))
    assert math.isfinite(m["train_loss"])


# ------------------------------------------------------------------------------------------- learning


def test_training_lowers_held_out_loss_on_learnable_data():
    """40 seeded steps on counting sequences (next token = token + 1) lower the loss on unseen sequences."""
    gen = torch.Generator().manual_seed(12)
    train = [make_batch([17, 17, 12, 17], T=16, gen=gen, learnable=True) for _ in range(8)]
    held_out = [make_batch([17, 10, 17, 17], T=16, gen=gen, learnable=True) for _ in range(2)]
    model = tiny_model(seed=1)
    before = evaluate(model, held_out)["loss"]
    metrics = train_local(model, endless(train), settings(local_steps=40, learning_rate=1e-2, lr_schedule="cosine",
                                                          warmup_steps=4, max_grad_norm=1.0))
    after = evaluate(model, held_out)["loss"]
    assert before > 0.9 * math.log(VOCAB)  # starts near chance
    assert after < 0.25 * before, (before, after)  # measured: 4.18 -> 0.31
    assert metrics["train_loss"] < before


@pytest.mark.slow  # ~14 s on 2 CPU cores
def test_training_lowers_held_out_loss_on_builtin_corpus():
    """10 seeded steps of the tiny preset (real Llama 3 vocabulary) on the built-in corpus, packed rows of 64
    tokens, batch 4, lower the loss on the held-out play. tok_embeddings is frozen: its dense 128256-row
    gradient and AdamW state would triple the CPU time, and it also exercises training with frozen weights."""
    data = pytest.importorskip("fedtp_flwr.data")
    from fedtp_flwr.model import preset_args

    try:
        tokenizer = data.Tokenizer()
    except FileNotFoundError as e:
        pytest.skip(f"no Llama 3 tokenizer file: {e}")
    train_rows = data.build_dataset(data.load_examples(data.builtin_corpus_path("train"))[:2000], tokenizer,
                                    max_seq_len=64, pack=True)
    held_rows = data.build_dataset(data.load_examples(data.builtin_corpus_path("eval"))[:300], tokenizer,
                                   max_seq_len=64, pack=True)
    held_out = data.eval_batches(held_rows, batch_size=4, max_batches=2)
    model = build_model(preset_args("llama3.2-tiny"), seed=0)
    model.tok_embeddings.weight.requires_grad_(False)
    before = evaluate(model, held_out)["loss"]
    metrics = train_local(model, data.iterate_batches(train_rows, 4, seed=0),
                          TrainSettings(learning_rate=5e-3, local_steps=10, seed=0))
    after = evaluate(model, held_out)["loss"]
    assert before == pytest.approx(math.log(128256), abs=0.1)  # chance level at init
    assert after < before - 2.0, (before, after)  # measured: 11.78 -> 8.52
    assert metrics["num_examples"] == 40 and metrics["num_tokens"] == 40 * 64


# ---------------------------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_cuda_bf16_training_and_evaluation_on_another_device():
    """On a GPU: a CPU model evaluated with device="cuda" goes back to the CPU, and two steps in "auto"
    precision (bf16 autocast) on the GPU track the same steps in fp32 on the CPU."""
    gen = torch.Generator().manual_seed(13)
    batch = make_batch([9, 7], T=8, gen=gen)
    cpu_model = tiny_model()
    out = evaluate(cpu_model, [batch], device="cuda", precision="fp32")
    assert cpu_model.output.weight.device.type == "cpu"
    assert out["loss"] == pytest.approx(evaluate(cpu_model, [batch])["loss"], rel=1e-4)

    gpu = build_model(tiny_args(), device="cuda", seed=0)
    s = settings(local_steps=2, proximal_mu=0.1, max_grad_norm=1.0)
    m_gpu = train_local(gpu, endless([batch]), s)
    m_cpu = train_local(cpu_model, endless([batch]), s)
    assert m_gpu["train_loss"] == pytest.approx(m_cpu["train_loss"], abs=0.02)  # bf16 vs fp32
    start = tiny_model().state_dict()
    for name, w in cpu_model.state_dict().items():
        g = gpu.state_dict()[name].cpu()
        # an AdamW step moves each weight by about lr, so bf16 vs fp32 can differ by at most a few lr
        torch.testing.assert_close(g, w, rtol=0, atol=1e-2, msg=name)
        assert not torch.equal(g, start[name]), name
