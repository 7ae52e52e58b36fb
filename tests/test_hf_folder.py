"""A Hugging Face Llama folder with its own tokenizer, fine-tuned through the app on chat data.

The folders are built here with transformers and a small byte-level BPE trained with `tokenizers`: a model
with 9 query heads and 3 kv heads (so W = 3), tied embeddings, no RoPE scaling and rope_theta 10000, its
tokenizer.json and tokenizer_config.json beside the weights, as on the Hub.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from fedtp_flwr.config import ConfigError
from fedtp_flwr.data import (
    Chat,
    DataError,
    HFTokenizer,
    Tokenizer,
    build_dataset,
    encode_chat,
    encode_prompt,
    load_examples,
    load_tokenizer,
)
from fedtp_flwr.model.checkpoint import export_hf, load_checkpoint, load_model
from fedtp_flwr.server.outputs import read_results, run_folders
from fedtp_flwr.tools.export import export_run_checkpoint

transformers = pytest.importorskip("transformers")

try:
    from conftest import COUNTRIES, LLAMA3_CHAT_SPECIALS, SMOL_SPECIALS, make_folder, train_tokenizer
except ImportError:  # collected as a package
    from tests.conftest import COUNTRIES, LLAMA3_CHAT_SPECIALS, SMOL_SPECIALS, make_folder, train_tokenizer  # type: ignore

def chat_records(pairs) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is the capital of {c}?"},
                          {"role": "assistant", "content": f"The capital of {c} is {k}."}]} for c, k in pairs]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------- the folder's tokenizer


def test_the_folder_tokenizer_is_used_with_the_special_ids_its_configs_name(tmp_path):
    folder = make_folder(tmp_path / "hf", tokenizer_config={
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True},
        "pad_token": "<|finetune_right_pad_id|>"})
    tok = load_tokenizer("", folder)
    assert isinstance(tok, HFTokenizer) and tok.path == str(folder / "tokenizer.json")
    ids = {name: tok.special_tokens[name] for name in LLAMA3_CHAT_SPECIALS}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids["<|begin_of_text|>"], ids["<|eot_id|>"],
                                                    ids["<|finetune_right_pad_id|>"])  # eos from tokenizer_config
    assert ids["<|end_of_text|>"] in tok.stop_tokens  # config.json's eos_token_id also stops generation
    text = "What is the capital of Peru?"
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.encode("<|eot_id|>", bos=False, eos=False) != [ids["<|eot_id|>"]]  # special text stays text
    # tokenizer-path may name the tokenizer.json itself (its configs are read from beside it)
    assert load_tokenizer(str(folder / "tokenizer.json")).eos_id == tok.eos_id


def test_ids_from_config_json_when_there_is_no_tokenizer_config(tmp_path):
    folder = make_folder(tmp_path / "hf", specials=SMOL_SPECIALS)
    config = json.loads((folder / "config.json").read_text())
    tok = load_tokenizer("", folder)
    assert (tok.bos_id, tok.eos_id) == (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert tok.pad_id == tok.eos_id


def test_a_smollm_style_tokenizer_trains_on_text_and_refuses_chat_data_by_name(tmp_path):
    folder = make_folder(tmp_path / "hf", specials=SMOL_SPECIALS,
                         tokenizer_config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    tok = load_tokenizer("", folder)
    assert tok.bos_id == tok.eos_id == 0
    text = build_dataset(["The capital of Peru is Lima."], tok, 16)
    assert text.rows[0][0] == 0 and text.rows[0][-1] == 0
    chats = load_examples(write_jsonl(tmp_path / "c.jsonl", chat_records(COUNTRIES[:1])), "auto")
    with pytest.raises(DataError, match=re.escape("no special token(s) ['<|begin_of_text|>', '<|start_header_id|>'")):
        build_dataset(chats, tok, 64)


def test_meta_tokenizer_model_in_original_is_used(tmp_path):
    from fedtp_flwr.data.tokenizer import default_tokenizer_path

    (tmp_path / "original").mkdir()
    shutil.copy(default_tokenizer_path(), tmp_path / "original" / "tokenizer.model")
    tok = load_tokenizer("", tmp_path)
    assert isinstance(tok, Tokenizer) and tok.path == tmp_path / "original" / "tokenizer.model"
    assert isinstance(load_tokenizer("", tmp_path / "elsewhere"), Tokenizer)  # no tokenizer: Llama 3's default


def test_a_bad_token_name_in_tokenizer_config_names_the_folder(tmp_path):
    folder = make_folder(tmp_path / "hf", tokenizer_config={"bos_token": "<s>", "eos_token": "<|eot_id|>"})
    with pytest.raises(DataError, match=re.escape(f"{folder}: the bos token '<s>' of its configs is not in")):
        load_tokenizer("", folder)


@pytest.mark.slow  # converts Meta's 128k-rank tiktoken file to a tokenizer.json with transformers (~7 s)
def test_llama3_tokenizer_json_gives_the_tiktoken_ids(tmp_path):
    """save_hf_tokenizer converts the tiktoken file (transformers' TikTokenConverter); reading the result
    back as a folder's tokenizer.json, and with transformers' AutoTokenizer, gives the tiktoken ids."""
    from fedtp_flwr.data import builtin_corpus_path
    from fedtp_flwr.data.tokenizer import save_hf_tokenizer

    tiktoken_tok = Tokenizer()
    assert save_hf_tokenizer(tiktoken_tok, tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    hf = load_tokenizer("", tmp_path)
    assert isinstance(hf, HFTokenizer) and hf.n_words == tiktoken_tok.n_words == 128256
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (128000, 128001, 128004)
    assert hf.special_tokens == tiktoken_tok.special_tokens
    text = "\n".join(e.text for e in load_examples(builtin_corpus_path("eval")))[:20_000]
    text += " naïve café 日本語 🤖 12345 3.14159"
    want = tiktoken_tok.encode(text, bos=True, eos=True)
    assert hf.encode(text, bos=True, eos=True) == want
    assert hf.decode(hf.encode(text, bos=False, eos=False)) == text
    # special-token text stays text, as in tiktoken (transformers would read it as the special id)
    assert hf.encode(" <|eot_id|>", bos=False, eos=False) == tiktoken_tok.encode(" <|eot_id|>", bos=False, eos=False)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto(text, add_special_tokens=False)["input_ids"] == want[1:-1]
    chat = [{"role": "user", "content": "Shall I compare thee to a summer's day?\n"}]
    prompt = auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(prompt["input_ids"]) == encode_prompt([("user", chat[0]["content"])], tiktoken_tok)


def test_an_exported_folder_carries_the_tokenizer_transformers_reads(tmp_path):
    folder = make_folder(tmp_path / "hf", tokenizer_config={"bos_token": "<|begin_of_text|>",
                                                             "eos_token": "<|eot_id|>"})
    tok = load_tokenizer("", folder)
    args, state = load_checkpoint(folder)
    export_hf(state, args, tmp_path / "out", tokenizer=tok)
    assert load_tokenizer("", tmp_path / "out").special_tokens == tok.special_tokens
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "What is the capital of Peru?"
    assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text, bos=False, eos=False)
    # the exported chat template renders what training rendered (transformers' apply_chat_template)
    messages = [("system", "Be brief. "), ("user", "What is the capital of Peru?"), ("assistant", "Lima.")]
    as_dicts = [{"role": r, "content": c} for r, c in messages]
    want, _ = encode_chat(Chat(tuple((r, c.strip()) for r, c in messages), "s"), tok)
    assert list(auto.apply_chat_template(as_dicts, tokenize=True, return_dict=True)["input_ids"]) == want
    prompt = auto.apply_chat_template(as_dicts[:2], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(prompt["input_ids"]) == encode_prompt(messages[:2], tok)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert tok.special_tokens["<|eot_id|>"] in generation["eos_token_id"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)


# ------------------------------------------------------------------------------------ through the app


def run_app(tmp_path: Path, folder: Path, **overrides) -> list:
    from fedtp_flwr.server.app import run
    from fedtp_flwr.testing.inprocess import InProcessGrid

    cfg = {"checkpoint-dir": str(folder), "world-size": 3, "num-server-rounds": 2, "local-steps": 6,
           "batch-size": 4, "max-seq-len": 64, "learning-rate": 3e-3, "eval-batches": 0, "max-batch-size": 8,
           "min-available-nodes": 3, "train-data": str(tmp_path / "train.jsonl"),
           "eval-data": str(tmp_path / "eval.jsonl"), "output-dir": str(tmp_path / "out"), **overrides}
    grid = InProcessGrid([{"partition-id": i, "num-partitions": 3} for i in range(3)], cfg)
    run(grid, cfg)
    return grid


@pytest.mark.slow  # two in-process rounds at W=3: ~5 s
def test_a_hf_folder_with_its_tokenizer_fine_tunes_on_chat_data_at_world_size_3(tmp_path):
    """9 heads / 3 kv heads at W=3, tied embeddings, the folder's tokenizer, chat training data and Alpaca
    held-out data: the held-out loss (responses only) falls, every node got a third of the heads, and the
    result exports to a folder transformers loads with the same logits."""
    folder = make_folder(tmp_path / "hf", tokenizer_config={"bos_token": "<|begin_of_text|>",
                                                             "eos_token": "<|eot_id|>"})
    write_jsonl(tmp_path / "train.jsonl", chat_records(COUNTRIES[:9]) * 4)
    write_jsonl(tmp_path / "eval.jsonl", [{"instruction": f"What is the capital of {c}?",
                                           "output": f"The capital of {c} is {k}."} for c, k in COUNTRIES[9:]])
    grid = run_app(tmp_path, folder)

    (history,) = read_results(tmp_path / "out" / "experiment_results_llama32.pkl").values()
    assert [r for r, _, _ in history] == [0, 1, 2] and all(math.isfinite(loss) for _, loss, _ in history)
    assert history[-1][1] < history[0][1] - 0.5, history
    args, _ = load_checkpoint(folder)
    for msg in grid.delivered:  # a third of the 9 query heads and of the 3 kv heads, the full embeddings
        arrays = msg.content["arrays"]
        assert tuple(arrays["layers.0.attention.wq.weight"].shape) == (3 * 8, 72)
        assert tuple(arrays["layers.0.attention.wk.weight"].shape) == (1 * 8, 72)
        assert tuple(arrays["tok_embeddings.weight"].shape) == (args.vocab_size, 72)
    assert all(not reply.has_error() for reply in grid.replies)

    (run_dir,) = run_folders(tmp_path / "out")
    export_run_checkpoint(run_dir / "checkpoints" / "llama32_hf_ws3_lr0.003_round2.pth",
                          tmp_path / "exported", "hf", "float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")  # the folder's tokenizer came along
    assert auto("The capital of Peru", add_special_tokens=False)["input_ids"] == load_tokenizer(
        "", folder).encode("The capital of Peru", bos=False, eos=False)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_model(tmp_path / "exported")
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() < 2e-4


def test_a_tokenizer_larger_than_the_model_stops_the_run_naming_both_numbers(tmp_path):
    n_words = train_tokenizer(LLAMA3_CHAT_SPECIALS).get_vocab_size(with_added_tokens=True)
    assert n_words > 300
    folder = make_folder(tmp_path / "hf", vocab_size=300)
    write_jsonl(tmp_path / "train.jsonl", chat_records(COUNTRIES))
    write_jsonl(tmp_path / "eval.jsonl", chat_records(COUNTRIES))
    with pytest.raises(ConfigError, match=rf"'checkpoint-dir' \(the folder's own tokenizer\).* has {n_words} ids, more "
                                          r"than the model's vocab_size 300"):
        run_app(tmp_path, folder)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pth"))


def test_world_sizes_the_heads_do_not_allow_are_refused(tmp_path):
    folder = make_folder(tmp_path / "hf")
    write_jsonl(tmp_path / "train.jsonl", chat_records(COUNTRIES))
    write_jsonl(tmp_path / "eval.jsonl", chat_records(COUNTRIES))
    with pytest.raises(ConfigError, match=r"world-size.*valid world sizes: \[1, 3\]"):
        run_app(tmp_path, folder, **{"world-size": 2})


@pytest.mark.slow  # one in-process round with a 49,152-row vocabulary
def test_a_smollm_style_folder_with_a_49k_vocabulary_fine_tunes_on_text(tmp_path):
    """SmolLM's shape of vocabulary (49,152 embedding rows, tied, <|endoftext|> as bos and eos): its
    tokenizer is smaller than the embedding (a padded vocabulary), text data, W = 3."""
    folder = make_folder(tmp_path / "hf", specials=SMOL_SPECIALS, vocab_size=49152,
                         tokenizer_config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    lines = [{"text": f"The capital of {c} is {k}."} for c, k in COUNTRIES] * 4
    write_jsonl(tmp_path / "train.jsonl", lines)
    write_jsonl(tmp_path / "eval.jsonl", lines[:12])
    run_app(tmp_path, folder, **{"num-server-rounds": 1, "local-steps": 3, "max-seq-len": 32})
    (history,) = read_results(tmp_path / "out" / "experiment_results_llama32.pkl").values()
    assert history[1][1] < history[0][1], history  # the held-out text loss fell
    args, _ = load_checkpoint(folder)
    assert args.vocab_size == 49152


@pytest.mark.slow  # the app in Flower's simulation runtime (tens of seconds)
@pytest.mark.usefixtures("no_leftover_processes")
def test_flwr_run_fine_tunes_a_hf_folder_on_chat_data_at_world_size_3(tmp_path):
    """The same folder and data through `flwr run . --stream` with three simulated SuperNodes."""
    from fedtp_flwr.testing import flower_harness as fh
    try:
        from conftest import APP_DIR
    except ImportError:  # collected as a package
        from tests.conftest import APP_DIR  # type: ignore[no-redef]

    folder = make_folder(tmp_path / "hf", tokenizer_config={"bos_token": "<|begin_of_text|>",
                                                             "eos_token": "<|eot_id|>"})
    write_jsonl(tmp_path / "train.jsonl", chat_records(COUNTRIES[:9]) * 4)
    write_jsonl(tmp_path / "eval.jsonl", [{"instruction": f"What is the capital of {c}?",
                                           "output": f"The capital of {c} is {k}."} for c, k in COUNTRIES[9:]])
    out = tmp_path / "out"
    config = {"checkpoint-dir": str(folder), "world-size": 3, "num-server-rounds": 2, "local-steps": 6,
              "batch-size": 4, "max-seq-len": 64, "learning-rate": 3e-3, "eval-batches": 0, "max-batch-size": 8,
              "min-available-nodes": 3, "train-data": str(tmp_path / "train.jsonl"),
              "eval-data": str(tmp_path / "eval.jsonl"), "output-dir": str(out.resolve())}
    res = fh.run_simulation(APP_DIR, config, num_supernodes=3, client_cpus=1, timeout_s=420)
    res.assert_ok()
    assert res.status == "finished:completed", res.describe()
    assert "responses only" in res.log_text and "HFTokenizer(" in res.log_text
    (history,) = read_results(out / "experiment_results_llama32.pkl").values()
    assert [r for r, _, _ in history] == [0, 1, 2]
    assert history[-1][1] < history[0][1] - 0.5, history
    (folder,) = run_folders(out)
    assert (folder / "checkpoints" / "llama32_hf_ws3_lr0.003_round2.pth").is_file()


def test_a_client_whose_tokenizer_does_not_fit_the_model_says_so(tmp_path):
    """In deployment each node reads checkpoint-dir / tokenizer-path on its own disk; a different tokenizer
    there is refused with both numbers, before any training."""
    from fedtp_flwr.client.app import local_dataset
    from fedtp_flwr.config import RunConfig

    folder = make_folder(tmp_path / "hf")
    n_words = load_tokenizer("", folder).n_words
    data = write_jsonl(tmp_path / "mine.jsonl", chat_records(COUNTRIES))
    cfg = RunConfig.from_run_config({"checkpoint-dir": str(folder)})
    assert local_dataset(cfg, {"data-path": str(data)}, "train", vocab_size=n_words).n_examples == len(COUNTRIES)
    with pytest.raises(DataError, match=rf"this node's tokenizer .* has {n_words} ids, more than the model's "
                                        rf"vocab_size {n_words - 1}"):
        local_dataset(cfg, {"data-path": str(data)}, "train", vocab_size=n_words - 1)
