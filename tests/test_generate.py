"""`python -m fedtp_flwr.tools.generate`: greedy decoding equals transformers' on the exported model, top-p
sampling stays inside the nucleus, and the CLI reads run checkpoints and folders with their tokenizers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedtp_flwr.data import ByteTokenizer, DataError
from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.server.outputs import RunOutputs
from fedtp_flwr.tools.generate import generate, load_for_generation, main, prompt_ids, sample_top_p

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=260, multiple_of=16, max_seq_len=64,
                 rope_theta=10000.0)


@torch.no_grad()
def spiky_model(seed: int = 0):
    """Random weights large enough that the next-token distribution is far from flat (greedy is stable)."""
    model = build_model(ARGS, seed=None)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if p.ndim == 1 else noise if "embed" in name else 2 * noise / math.sqrt(p.shape[1]))
    return model.eval()


def run_checkpoint(tmp_path, model, tokenizer_path="bytes"):
    out = RunOutputs(tmp_path, (2, 1e-3, False, 1, 0), 2, 1, 1e-3, "custom",
                     {"model-args": json.dumps(ARGS.to_params()), "tokenizer-path": tokenizer_path,
                      "checkpoint-dir": ""})
    out.record(1, 1.0, 2.7, model.state_dict())
    return out.checkpoint_path(1)


def test_greedy_equals_transformers_generate_on_the_exported_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fedtp_flwr.model.checkpoint import export_hf

    model = spiky_model()
    export_hf(model.state_dict(), ARGS, tmp_path / "hf", dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = [256, 72, 101, 108, 108, 111]
    ours = generate(model, prompt, max_new_tokens=20)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    assert len(set(ours)) > 1  # guard: not one token repeated


def test_generation_stops_at_a_stop_token():
    model = spiky_model()
    free = generate(model, [256, 65], max_new_tokens=10)
    assert generate(model, [256, 65], max_new_tokens=10, stop_tokens=[free[3]]) == free[:free.index(free[3])]


def test_top_p_samples_only_inside_the_nucleus_and_is_seeded():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    gen = torch.Generator().manual_seed(0)
    draws = [sample_top_p(logits, 0.7, generator=gen) for _ in range(300)]
    assert set(draws) == {1, 2}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are outside
    assert sample_top_p(logits, 1e-6, generator=gen) == 1  # a tiny nucleus is greedy
    model = spiky_model()
    a = generate(model, [256, 65], 12, top_p=0.9, temperature=1.0, seed=5)
    assert a == generate(model, [256, 65], 12, top_p=0.9, temperature=1.0, seed=5)
    assert generate(model, [256, 65], 12, top_p=1e-6, seed=5) == generate(model, [256, 65], 12)


def test_cli_on_a_run_checkpoint_uses_the_runs_tokenizer(tmp_path, capsys):
    model = spiky_model()
    path = run_checkpoint(tmp_path, model)
    loaded, tok = load_for_generation(path)
    assert isinstance(tok, ByteTokenizer)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    main([str(path), "--prompt", "Hello", "--max-new-tokens", "8"])
    expected = tok.decode(generate(model, tok.encode("Hello", bos=True, eos=False), 8, tok.stop_tokens))
    assert capsys.readouterr().out == expected + "\n"


def test_cli_chat_needs_a_tokenizer_with_the_chat_tokens(tmp_path):
    path = run_checkpoint(tmp_path, spiky_model())
    with pytest.raises(DataError, match="Llama 3 chat format"):
        main([str(path), "--prompt", "Hi", "--chat"])


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    path = run_checkpoint(tmp_path, spiky_model(), tokenizer_path="")  # Llama 3's 128,256 ids
    with pytest.raises(ValueError, match="128256 ids, more than the model's vocab_size 260"):
        load_for_generation(path)


def test_chat_prompt_ends_with_the_assistant_header():
    from fedtp_flwr.data import Tokenizer

    tok = Tokenizer()
    ids = prompt_ids(tok, "Hi?", chat=True, system="Be brief.")
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.eot_id in tok.stop_tokens


@pytest.mark.slow  # builds a HF folder with transformers and runs the CLI on it
def test_cli_on_a_hf_folder_with_its_own_tokenizer_in_chat_mode(tmp_path, capsys):
    try:
        from conftest import make_folder
    except ImportError:  # collected as a package
        from tests.conftest import make_folder  # type: ignore
    folder = make_folder(tmp_path / "hf", tokenizer_config={"bos_token": "<|begin_of_text|>",
                                                             "eos_token": "<|eot_id|>"})
    model, tok = load_for_generation(folder)
    ids = prompt_ids(tok, "What is the capital of Peru?", chat=True)
    expected = tok.decode(generate(model, ids, 6, tok.stop_tokens))
    main([str(folder), "--chat", "--prompt", "What is the capital of Peru?", "--max-new-tokens", "6"])
    assert capsys.readouterr().out == expected + "\n"
