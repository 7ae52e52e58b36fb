"""Instruction (Alpaca) and chat data: Llama 3 chat rendering with real special ids, loss on the responses
only, packing that keeps each response with its own prompt, per-file format detection, file:line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fedtp_flwr.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    Chat,
    DataError,
    Example,
    Tokenizer,
    build_dataset,
    encode_chat,
    encode_prompt,
    eval_batches,
    iterate_batches,
    load_examples,
)
from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.training import evaluate

BOT, START, END, EOT = 128000, 128006, 128007, 128009  # Llama 3 special ids


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def text_ids(tok, s):
    return tok.encode(s, bos=False, eos=False)


ALPACA = {"instruction": "Name a colour.", "input": "Not red.", "output": "Blue."}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                     {"role": "assistant", "content": "Bye."}]}


def test_alpaca_renders_in_the_llama3_chat_format_with_loss_on_the_output_only(tmp_path, tok):
    (chat,) = load_examples(jsonl(tmp_path / "a.jsonl", [ALPACA]), "alpaca")
    assert chat == Chat((("user", "Name a colour.\n\nNot red."), ("assistant", "Blue.")), "a")
    ids, mask = encode_chat(chat, tok)
    nl = text_ids(tok, "\n\n")
    prompt = [BOT, START, *text_ids(tok, "user"), END, *nl, *text_ids(tok, "Name a colour.\n\nNot red."), EOT,
              START, *text_ids(tok, "assistant"), END, *nl]
    answer = [*text_ids(tok, "Blue."), EOT]
    assert ids == prompt + answer
    assert mask == [False] * len(prompt) + [True] * len(answer)
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a colour.\n\nNot "
                               "red.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>")
    assert encode_prompt([("user", "Name a colour.\n\nNot red.")], tok) == prompt


def test_special_token_text_in_a_message_stays_text(tok):
    ids, _ = encode_chat(Chat((("user", "<|eot_id|>"), ("assistant", "<|start_header_id|>x")), "s"), tok)
    assert ids.count(EOT) == 2 and ids.count(START) == 2  # the real ones only


def test_chat_loss_covers_every_assistant_turn_and_nothing_else(tmp_path, tok):
    ds = build_dataset(load_examples(jsonl(tmp_path / "c.jsonl", [CHAT]), "chat"), tok, max_seq_len=128)
    (inputs, targets), = eval_batches(ds, 4)
    counted = targets[targets != IGNORE_INDEX].tolist()
    assert tok.decode(counted) == "Hello.<|eot_id|>Bye.<|eot_id|>"
    assert ds.n_target_tokens == len(counted)


def test_alpaca_without_input_and_source_tags(tmp_path, tok):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "Hi.", "source": "greet"}])
    (chat,) = load_examples(path, "auto")
    assert chat == Chat((("user", "Say hi."), ("assistant", "Hi.")), "greet")


def test_packing_keeps_whole_examples_and_never_targets_the_next_prompt(tmp_path, tok):
    records = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(1, i + 2)))} for i in range(12)]
    examples = load_examples(jsonl(tmp_path / "a.jsonl", records), "alpaca")
    alone = [encode_chat(e, tok) for e in examples]
    ds = build_dataset(examples, tok, max_seq_len=80, pack=True)
    assert len(ds) < len(examples) and all(len(row) <= 81 for row in ds.rows)
    # every row is a concatenation of whole examples, in order, with their own masks
    flat_ids = [i for row in ds.rows for i in row]
    flat_mask = [m for mask in ds.masks for m in mask]
    assert flat_ids == [i for ids, _ in alone for i in ids]
    assert flat_mask == [m for _, mask in alone for m in mask]
    for batch_inputs, batch_targets in eval_batches(ds, 2):
        for inp, tgt in zip(batch_inputs.tolist(), batch_targets.tolist()):
            for j, t in enumerate(tgt):
                if inp[j] == EOT and j + 1 < len(inp) and inp[j + 1] == BOT:  # an example ends, the next begins
                    assert t == IGNORE_INDEX  # its <|begin_of_text|> is never predicted from the answer
            assert BOT not in [t for t in tgt if t != IGNORE_INDEX]
    counted = sum(int((t != IGNORE_INDEX).sum()) for _, t in eval_batches(ds, 3))
    assert counted == ds.n_target_tokens == sum(sum(m) for _, m in alone)


def test_training_batches_carry_the_mask(tmp_path, tok):
    ds = build_dataset(load_examples(jsonl(tmp_path / "a.jsonl", [ALPACA] * 3), "alpaca"), tok, 64, pack=True)
    inputs, targets = next(iterate_batches(ds, 2, seed=0))
    assert tok.decode(targets[targets != IGNORE_INDEX].tolist()).count("Blue.<|eot_id|>") == 3


def test_truncated_responses_are_dropped_and_counted(tmp_path, tok):
    long_prompt = {"instruction": "word " * 200, "output": "Yes."}
    ds = build_dataset(load_examples(jsonl(tmp_path / "a.jsonl", [long_prompt, ALPACA]), "alpaca"), tok, 48)
    assert (ds.n_examples, ds.n_truncated, ds.n_dropped, len(ds)) == (1, 1, 1, 1)
    with pytest.raises(DataError, match="none of the 1 examples has a response token within max_seq_len=48"):
        build_dataset(load_examples(tmp_path / "a.jsonl", "alpaca")[:1], tok, 48)


def test_auto_detects_the_format_per_file(tmp_path, tok):
    jsonl(tmp_path / "a_alpaca.jsonl", [ALPACA])
    jsonl(tmp_path / "b_chat.jsonl", [CHAT])
    jsonl(tmp_path / "c_text.jsonl", [{"text": "Plain prose."}])
    (tmp_path / "d.txt").write_text("A line.\n")
    got = load_examples(tmp_path, "auto")
    assert [type(e).__name__ for e in got] == ["Chat", "Chat", "Example", "Example"]
    assert got[2] == Example("Plain prose.", "c_text")
    ds = build_dataset(got, tok, 128)  # text examples next to chats: every text token counts
    assert ds.masks is not None and ds.masks[2] == [False] + [True] * (len(ds.rows[2]) - 1)


def test_text_only_data_builds_exactly_as_before(tmp_path, tok):
    """Plain text takes the old path (no masks): the same rows, packed windows overlapping by one."""
    path = jsonl(tmp_path / "t.jsonl", [{"text": "To be, or not to be, that is the question."}] * 4)
    ds = build_dataset(load_examples(path, "auto"), tok, 8, pack=True)
    assert ds.masks is None and ds.rows == build_dataset(load_examples(path), tok, 8, pack=True).rows


BAD = {
    "missing output": ([{"instruction": "x"}], "alpaca", 1, 'missing "output" key'),
    "empty output": ([ALPACA, {"instruction": "x", "output": " "}], "alpaca", 2, '"output" is empty'),
    "input not a string": ([{"instruction": "x", "input": 3, "output": "y"}], "alpaca", 1,
                           '"input" must be a string, got int'),
    "messages not a list": ([{"messages": "hi"}], "chat", 1, '"messages" must be a non-empty list, got str'),
    "empty messages": ([{"messages": []}], "chat", 1, '"messages" must be a non-empty list, got an empty list'),
    "message not an object": ([{"messages": ["hi"]}], "chat", 1, "message 1 must be an object"),
    "unknown role": ([{"messages": [{"role": "narrator", "content": "x"}]}], "chat", 1,
                     "message 1 has an unknown role (allowed: system, user, assistant, ipython, tool)"),
    "content not a string": ([{"messages": [{"role": "user", "content": None}]}], "chat", 1,
                             'message 1: "content" must be a string, got NoneType'),
    "no assistant": ([CHAT, {"messages": [{"role": "user", "content": "x"}]}], "chat", 2, "no assistant message"),
    "mixed shapes under auto": ([ALPACA, CHAT], "auto", 2,
                                "a record in the chat format, but line 1 made this a alpaca file"),
    "text record in a chat file": ([CHAT, {"text": "x"}], "chat", 2, 'missing "messages" key'),
    "bad source": ([{**ALPACA, "source": 5}], "auto", 1, '"source" must be a non-empty string'),
    "not an object": (["[1]"], "chat", 1, "expected a JSON object with a chat record, got list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_name_file_and_line(tmp_path, case):
    records, fmt, line, what = BAD[case]
    path = jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(what)):
        load_examples(path, fmt)


def test_errors_never_echo_the_record(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "SECRET-ROLE", "content": "SECRET"}]}])
    with pytest.raises(DataError) as err:
        load_examples(path, "chat")
    assert "SECRET" not in str(err.value)


def test_txt_file_with_an_instruction_format_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'a.txt'}: a .txt file holds text, but data-format is 'chat'")):
        load_examples(tmp_path / "a.txt", "chat")
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        load_examples(tmp_path / "a.txt", "csv")


def test_a_tokenizer_without_the_chat_tokens_is_refused_by_name(tmp_path):
    chats = load_examples(jsonl(tmp_path / "a.jsonl", [ALPACA]), "alpaca")
    with pytest.raises(DataError, match=r"ByteTokenizer.*no special token\(s\) \['<\|start_header_id\|>'"):
        build_dataset(chats, ByteTokenizer(), 64)


def test_held_out_loss_is_the_mean_nll_of_the_response_tokens(tmp_path, tok):
    """evaluate() on chat data equals the NLL averaged over the response positions, computed by hand."""
    ds = build_dataset(load_examples(jsonl(tmp_path / "c.jsonl", [CHAT, CHAT]), "auto"), tok, 128, pack=True)
    model = build_model(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words,
                                  multiple_of=16), seed=0)
    res = evaluate(model, eval_batches(ds, 4))
    row, mask = torch.tensor(ds.rows[0]), torch.tensor(ds.masks[0])
    with torch.no_grad():
        logp = model(row[None, :-1])[0].log_softmax(-1)
    nll = -logp[torch.arange(len(row) - 1), row[1:]]
    want = nll[mask[1:]].mean().item()
    assert len(ds) == 1 and mask[1:].sum() < len(row) - 1  # guard: some tokens were left out
    assert res["loss"] == pytest.approx(want, rel=1e-5)
    assert res["num_tokens"] == int(mask[1:].sum())


@pytest.mark.slow  # one in-process round of the byte-level preset
def test_chat_training_data_with_the_builtin_held_out_corpus(tmp_path):
    """data-format = "chat" applies to the files the run names; the built-in corpus stays text. (The
    byte tokenizer has no chat tokens, so the chat file is refused by name, after the held-out text
    built.)"""
    from fedtp_flwr.server.app import run
    from fedtp_flwr.testing.inprocess import InProcessGrid

    cfg = {"model": "bytes-small", "tokenizer-path": "bytes", "data-format": "chat", "num-server-rounds": 1,
           "local-steps": 1, "max-seq-len": 32, "eval-batches": 1, "min-available-nodes": 1,
           "output-dir": str(tmp_path / "out"),
           "train-data": str(jsonl(tmp_path / "c.jsonl", [CHAT] * 4))}
    from fedtp_flwr.server.strategy import RunFailed

    grid = InProcessGrid([{"partition-id": 0, "num-partitions": 1}], cfg)
    with pytest.raises(RunFailed, match="0 valid replies"):  # no client could train: the run fails
        run(grid, cfg)
    assert grid.replies and all(r.has_error() and "chat format" in r.error.reason for r in grid.replies)
