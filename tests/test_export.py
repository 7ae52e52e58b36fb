"""A run checkpoint exports to Hugging Face (loads in transformers, same logits) and Meta formats."""

import json

import pytest
import torch

from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.model.checkpoint import load_checkpoint
from fedtp_flwr.server.outputs import RunOutputs
from fedtp_flwr.tools.export import export_run_checkpoint

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, use_scaled_rope=True)


@pytest.fixture
def run_checkpoint(tmp_path):
    model = build_model(ARGS, seed=3)
    out = RunOutputs(tmp_path, (2, 1e-3, False, 1, 3), 2, 1, 1e-3, "custom",
                     {"model-args": json.dumps(ARGS.to_params())})
    out.record(1, 1.0, 2.7, model.state_dict())
    return out.checkpoint_path(1), model


def test_export_hf_gives_the_same_logits_in_transformers(run_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, model = run_checkpoint
    export_run_checkpoint(path, tmp_path / "hf", "hf", "float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() < 2e-4


def test_export_meta_round_trips(run_checkpoint, tmp_path):
    path, model = run_checkpoint
    export_run_checkpoint(path, tmp_path / "meta", "meta", "float32")
    args, state = load_checkpoint(tmp_path / "meta")
    assert args == ARGS
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
