"""Text loading (and its errors), token rows and batches, the loss, and client partitions."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from fedtp_flwr.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    Tokenizer,
    build_dataset,
    collate,
    eval_batches,
    iterate_batches,
    load_examples,
    partition_examples,
    perplexity,
    token_loss,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def write(path, content: str | bytes):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------ loading


def test_txt_is_one_example_per_nonblank_line(tmp_path):
    path = write(tmp_path / "plays.txt", "\ufeffFirst line.\n\n   \n  Second line.  \r\nThird")
    assert load_examples(path) == [Example(t, "plays") for t in ("First line.", "Second line.", "Third")]


def test_jsonl_reads_text_and_optional_source(tmp_path):
    lines = [json.dumps({"text": "a b"}), "", json.dumps({"text": "c", "source": "news", "id": 3})]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert load_examples(path) == [Example("a b", "d"), Example("c", "news")]


def test_directory_reads_txt_and_jsonl_files_in_sorted_order_not_recursively(tmp_path):
    write(tmp_path / "b.txt", "from b\n")
    write(tmp_path / "a.jsonl", json.dumps({"text": "from a"}) + "\n")
    write(tmp_path / "notes.md", "ignored\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.txt", "not read\n")
    assert load_examples(tmp_path) == [Example("from a", "a"), Example("from b", "b")]


BAD_JSONL = {
    "invalid JSON": ('{"text": "ok"}\n\n{"text": "unterminated\n', 3, "invalid JSON"),
    "missing text": ('{"text": "ok"}\n{"body": "x"}\n', 2, 'missing "text" key'),
    "text not a string": ('{"text": 42}\n', 1, '"text" must be a string, got int'),
    "null text": ('{"text": "ok"}\n{"text": null}\n', 2, '"text" must be a string, got NoneType'),
    "not an object": ('["text", "x"]\n', 1, "expected a JSON object"),
    "empty text": ('{"text": "  "}\n', 1, '"text" is empty'),
    "bad source": ('{"text": "x", "source": 7}\n', 1, '"source" must be a non-empty string'),
    "invalid UTF-8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "invalid UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path, case):
    content, line, what = BAD_JSONL[case]
    path = write(tmp_path / "train.jsonl", content)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: {what}")):
        load_examples(path)


def test_invalid_utf8_in_txt_names_file_and_line(tmp_path):
    path = write(tmp_path / "t.txt", b"fine\n\nbroken \xff\xfe here\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid UTF-8 (byte 8 of the line)")):
        load_examples(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_file_is_an_error_naming_it(tmp_path, content, suffix):
    path = write(tmp_path / f"empty{suffix}", content)
    with pytest.raises(DataError, match=re.escape(f"{path}: file has no examples")):
        load_examples(path)


def test_empty_file_inside_a_directory_is_an_error_naming_it(tmp_path):
    write(tmp_path / "a.txt", "fine\n")
    empty = write(tmp_path / "b.txt", "")
    with pytest.raises(DataError, match=re.escape(f"{empty}: file has no examples")):
        load_examples(tmp_path)


def test_directory_without_data_files_is_an_error(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: directory has no .txt or .jsonl files")):
        load_examples(tmp_path)
    write(tmp_path / "data.csv", "a,b\n")
    with pytest.raises(DataError, match="directory has no .txt or .jsonl files"):
        load_examples(tmp_path)


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file or directory")):
        load_examples(tmp_path / "nope.jsonl")


def test_unsupported_extension_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path / "data.csv", "text\nhello\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: unsupported file type '.csv'")):
        load_examples(path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------- rows and batches


def test_collate_shifts_pads_and_ignores_padding_targets():
    inputs, targets = collate([[1, 2, 3, 4], [5, 6]], pad_id=9)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [[1, 2, 3], [5, 6, 9]]
    assert targets.tolist() == [[2, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]


def test_padded_dataset_adds_bos_eos_truncates_and_pads(tok):
    long_text = "word " * 50
    data = build_dataset(["Hello, world!", long_text], tok, max_seq_len=8)
    assert data.rows[0] == [tok.bos_id, 9906, 11, 1917, 0, tok.eos_id]
    assert len(data.rows[1]) == 9 and data.rows[1][0] == tok.bos_id  # max_seq_len + 1 ids, EOS cut off
    assert (data.n_examples, data.n_truncated, data.packed) == (2, 1, False)
    inputs, targets = collate(data.rows, data.pad_id)
    assert inputs.shape == targets.shape == (2, 8)
    assert inputs[0].tolist() == [tok.bos_id, 9906, 11, 1917, 0, tok.eos_id, tok.pad_id, tok.pad_id]
    assert targets[0].tolist() == [9906, 11, 1917, 0, tok.eos_id, -100, -100, -100]
    assert (targets[1] != IGNORE_INDEX).all()


def test_packing_has_no_padding_and_predicts_every_token_once(tok):
    texts = [f"Speech number {i} is a little longer than the one before it." * (1 + i % 3) for i in range(40)]
    data = build_dataset(texts, tok, max_seq_len=16, pack=True)
    stream = [t for text in texts for t in tok.encode(text, bos=True, eos=True)]
    assert data.packed and all(len(row) == 17 for row in data.rows)
    assert len(data) == (len(stream) - 1) // 16
    # windows overlap by one id, so the targets are the stream after its first id, in order
    assert [t for row in data.rows for t in row[1:]] == stream[1 : 1 + 16 * len(data)]
    for inputs, targets in iterate_batches(data, batch_size=5, seed=0, epochs=1):
        assert inputs.shape[1] == 16
        assert (targets != IGNORE_INDEX).all() and (inputs != tok.pad_id).all()


def test_packing_too_little_text_is_an_error(tok):
    with pytest.raises(DataError, match="packing needs at least 513 tokens"):
        build_dataset(["short"], tok, max_seq_len=512, pack=True)


def test_no_examples_is_an_error(tok):
    with pytest.raises(DataError, match="no examples"):
        build_dataset([], tok, max_seq_len=8)


def test_iterate_batches_is_seeded_and_each_epoch_visits_every_row_once(tok):
    data = build_dataset([f"example {i}" for i in range(23)], tok, max_seq_len=8)
    first = [x.tolist() for x, _ in itertools.islice(iterate_batches(data, 5, seed=1), 10)]
    again = [x.tolist() for x, _ in itertools.islice(iterate_batches(data, 5, seed=1), 10)]
    other = [x.tolist() for x, _ in itertools.islice(iterate_batches(data, 5, seed=2), 10)]
    assert first == again and first != other
    epoch = list(iterate_batches(data, 5, seed=1, epochs=1))
    assert [len(x) for x, _ in epoch] == [5, 5, 5, 5, 3]
    seen = sorted(tuple(row[row != tok.pad_id].tolist()) for x, _ in epoch for row in x)
    assert seen == sorted(tuple(row[:-1]) for row in data.rows)


def test_eval_batches_are_fixed_and_in_order(tok):
    data = build_dataset([f"example {i}" for i in range(10)], tok, max_seq_len=8)
    batches = eval_batches(data, batch_size=4)
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert batches[0][0][0].tolist()[:4] == data.rows[0][:4]
    assert len(eval_batches(data, batch_size=4, max_batches=2)) == 2


# -------------------------------------------------------------------------------------------- loss


def test_token_loss_equals_hand_computed_nll_over_real_tokens():
    logits = torch.tensor(
        [[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
         [[1.0, 1.0, 0.0], [50.0, -50.0, 9.0], [7.0, 7.0, -7.0]]]  # row 2: last two are padding
    )
    targets = torch.tensor([[0, 2, 2], [1, IGNORE_INDEX, IGNORE_INDEX]])

    def nll(row, k):
        return -(row[k] - math.log(sum(math.exp(v) for v in row)))

    by_hand = [nll([2, 0, 0], 0), nll([0, 1, 0], 2), nll([0, 0, 3], 2), nll([1, 1, 0], 1)]
    sum_nll, n_tokens = token_loss(logits, targets)
    assert n_tokens == 4
    assert sum_nll.item() == pytest.approx(sum(by_hand), rel=1e-6)
    mean = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert (sum_nll / n_tokens).item() == pytest.approx(mean.item(), rel=1e-6)


def test_perplexity_is_exp_mean_nll_over_real_tokens_only():
    vocab = 7
    logits = torch.zeros(2, 5, vocab)  # uniform prediction: perplexity == vocab
    logits[1, 3:] = torch.tensor([1e4] + [0.0] * (vocab - 1))  # wild logits at padding must not matter
    targets = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, IGNORE_INDEX, IGNORE_INDEX]])
    sum_nll, n_tokens = token_loss(logits, targets)
    assert n_tokens == 8
    assert perplexity(sum_nll.item(), n_tokens) == pytest.approx(vocab, rel=1e-6)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_padded_batch_loss_equals_per_example_unpadded_loss(tok):
    """Through the real model: right padding changes nothing, and the batch's NLL sum is the sum of
    each example's NLL computed alone without padding."""
    from fedtp_flwr.model import ModelArgs, build_model

    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, max_seq_len=32)
    model = build_model(args)
    data = build_dataset(["Hello, world!", "To be, or not to be: that is the question.", "Ay."], tok, 16)

    def loss_of(rows):
        inputs, targets = collate(rows, data.pad_id)
        return token_loss(model(inputs), targets)

    with torch.no_grad():
        batch_sum, batch_n = loss_of(data.rows)
        alone = [loss_of([row]) for row in data.rows]
    assert batch_n == sum(n for _, n in alone) == data.n_target_tokens
    assert batch_sum.item() == pytest.approx(sum(s.item() for s, _ in alone), rel=1e-5)


def test_token_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        token_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.int64))


# ------------------------------------------------------------------------------------- partitions


def examples_from(sources: dict[str, int]) -> list[Example]:
    return [Example(f"{src} {i}", src) for src, n in sources.items() for i in range(n)]


@pytest.mark.parametrize("num_partitions", [1, 2, 3, 7])
def test_iid_partitions_are_disjoint_cover_everything_and_balanced(num_partitions):
    examples = examples_from({"a": 40, "b": 31})
    parts = [partition_examples(examples, i, num_partitions, seed=3) for i in range(num_partitions)]
    texts = [e.text for part in parts for e in part]
    assert sorted(texts) == sorted(e.text for e in examples) and len(set(texts)) == len(texts)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert partition_examples(examples, 0, num_partitions, seed=3) == parts[0]
    if num_partitions > 1:
        assert partition_examples(examples, 0, num_partitions, seed=4) != parts[0]


def test_by_source_partitions_hold_disjoint_whole_sources():
    examples = examples_from({"hamlet": 5, "lear": 3, "tempest": 4, "othello": 2, "macbeth": 6})
    parts = [partition_examples(examples, i, 2, seed=0, scheme="by-source") for i in range(2)]
    sources = [{e.source for e in part} for part in parts]
    assert not sources[0] & sources[1] and sources[0] | sources[1] == {e.source for e in examples}
    assert sum(len(p) for p in parts) == len(examples)


def test_empty_partition_is_an_error_naming_id_count_and_size():
    with pytest.raises(DataError, match=r"partition 0 of 5 has no examples \(iid split of 3 examples\)"):
        partition_examples(examples_from({"a": 3}), 0, 5)
    message = r"partition 2 of 3 has no examples \(by-source split of 4 examples from 2 sources"
    with pytest.raises(DataError, match=message):
        partition_examples(examples_from({"a": 2, "b": 2}), 2, 3, scheme="by-source")


def test_bad_partition_arguments_are_refused():
    examples = examples_from({"a": 4})
    with pytest.raises(ValueError, match="partition_id must be in 0..1"):
        partition_examples(examples, 2, 2)
    with pytest.raises(ValueError, match="unknown partition scheme 'dirichlet'"):
        partition_examples(examples, 0, 2, scheme="dirichlet")
