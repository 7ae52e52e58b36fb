"""The chunked loss equals the loss from full logits, and so do its gradients, for any chunk size."""

import pytest
import torch

from fedtp_flwr.data.loss import token_loss
from fedtp_flwr.model import build_model, preset_args
from fedtp_flwr.training.chunked_loss import chunked_token_loss


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_loss_and_gradients_equal_the_full_logits_path(chunk):
    model = build_model(preset_args("bytes-small"), seed=3)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randint(0, 260, (2, 32), generator=g), torch.randint(0, 260, (2, 32), generator=g)
    t[1, :5] = -100  # padding is not counted
    ref, n = token_loss(model(x), t)
    grads_ref = torch.autograd.grad(ref, list(model.parameters()))
    got = chunked_token_loss(model.hidden_states(x), model.output, t, chunk)
    grads = torch.autograd.grad(got, list(model.parameters()))
    assert n == 64 - 5
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        # float32 summation order differs: measured <= 7e-7 of the largest gradient entry
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name


def test_bf16_autocast_matches_within_bf16_precision():
    model = build_model(preset_args("bytes-small"), seed=3)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randint(0, 260, (2, 32), generator=g), torch.randint(0, 260, (2, 32), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = token_loss(model(x), t)[0]
        got = chunked_token_loss(model.hidden_states(x), model.output, t, 16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)


def test_bad_arguments_are_refused():
    model = build_model(preset_args("bytes-small"), seed=3)
    h = model.hidden_states(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_loss(h, model.output, torch.zeros(1, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="do not match"):
        chunked_token_loss(h, model.output, torch.zeros(1, 5, dtype=torch.long), 2)
