"""The Llama 3 tokenizer: pinned ids from Meta's tokenizer.model, special tokens, round trips, long inputs."""

from __future__ import annotations

import pytest

from fedtp_flwr.data import DataError, Tokenizer
from fedtp_flwr.data.tokenizer import MAX_ENCODE_CHARS, special_token_names

# Computed once with tiktoken over llama-models 0.3.0's llama3/tokenizer.model (and identical from Meta's
# own llama_models.llama3.tokenizer.Tokenizer); BOS / EOS not included.
PINNED = {
    "Hello, world!": [9906, 11, 1917, 0],
    "The quick brown fox jumps over the lazy dog.": [
        791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13,
    ],
    "Shall I compare thee to a summer's day?": [2059, 543, 358, 9616, 40344, 311, 264, 7474, 596, 1938, 30],
    "naïve café 日本語 🤖": [3458, 38672, 588, 53050, 105180, 102158, 11410, 97, 244],
    "12345 3.14159": [4513, 1774, 220, 18, 13, 9335, 2946],
    " Hello": [22691],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.mark.parametrize("text", list(PINNED))
def test_encode_matches_pinned_llama3_ids(tok, text):
    assert tok.encode(text, bos=False, eos=False) == PINNED[text]
    assert tok.encode(text, bos=True, eos=True) == [128000, *PINNED[text], 128001]


def test_special_token_ids_and_vocab_size(tok):
    assert tok.n_words == 128256
    ids = (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id, tok.eom_id)
    assert ids == (128000, 128001, 128004, 128009, 128008)
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
        "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|image|>": 128011,
        "<|reserved_special_token_2|>": 128012, "<|reserved_special_token_245|>": 128255,
    }
    assert {name: tok.special_tokens[name] for name in expected} == expected
    assert len(special_token_names()) == len(set(special_token_names())) == 256
    assert tok.decode([128009]) == "<|eot_id|>"


def test_special_token_text_is_encoded_as_ordinary_text(tok):
    ids = tok.encode("<|eot_id|><|begin_of_text|>", bos=False, eos=False)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == "<|eot_id|><|begin_of_text|>"


@pytest.mark.parametrize(
    "text", ["", "Hello, world!", "  leading and trailing  \n\n", "naïve café 日本語 🤖", "\t<|x|>\r\n"]
)
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_matches_meta_reference_tokenizer_on_natural_text(tok):
    """Parity with Meta's own implementation on a few KB of the built-in corpus (ids, not just text)."""
    meta = pytest.importorskip("llama_models.llama3.tokenizer").Tokenizer.get_instance()
    from fedtp_flwr.data import builtin_corpus_path, load_examples

    text = "\n".join(e.text for e in load_examples(builtin_corpus_path("eval")))[:20_000]
    assert tok.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)


def test_million_character_input_encodes_and_round_trips(tok):
    """Past tiktoken's ~400k-character limit, with a 60k-character run of one letter and of spaces."""
    text = ("To be, or not to be, that is the question. " * 21_000) + "a" * 60_000 + " " * 60_000 + "end"
    assert len(text) > 1_000_000 > MAX_ENCODE_CHARS
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == text


def test_chunked_encoding_equals_uncut_encoding_on_ordinary_text(tok):
    """Cuts fall before a space, where the pre-tokenizer cuts anyway, so no ids change at the seams."""
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York; " * 6_000
    assert len(text) > MAX_ENCODE_CHARS
    assert tok.encode(text, bos=False, eos=False) == tok.model.encode_ordinary(text)


def test_missing_tokenizer_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Tokenizer(missing)


def test_unreadable_or_corrupt_tokenizer_file_names_path_and_line(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        Tokenizer(tmp_path)  # a directory
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nthis is not base64 at all\n")
    with pytest.raises(DataError, match=rf"{bad}:2: not a tiktoken BPE file"):
        Tokenizer(bad)
    bad.write_text("")
    with pytest.raises(DataError, match="no BPE ranks"):
        Tokenizer(bad)


def test_custom_tokenizer_file(tmp_path):
    """A user's own tiktoken file works; the 256 special tokens follow its own ranks."""
    import base64

    path = tmp_path / "tiny.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tiny = Tokenizer(path)
    assert (tiny.n_words, tiny.bos_id, tiny.pad_id) == (512, 256, 260)
    assert tiny.encode("hi", bos=True, eos=False) == [256, ord("h"), ord("i")]


# ------------------------------------------------------------------------------------ byte tokenizer


@pytest.mark.parametrize("text", ["", "Hello, world!", "naïve café 日本語 🤖", "tab\tnew\nline \x00 end"])
def test_byte_tokenizer_round_trips_utf8(text):
    from fedtp_flwr.data import ByteTokenizer

    bt = ByteTokenizer()
    ids = bt.encode(text, bos=False, eos=False)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert bt.decode(ids) == text
    assert bt.encode(text, bos=True, eos=True) == [bt.bos_id, *ids, bt.eos_id]


def test_byte_tokenizer_special_ids():
    from fedtp_flwr.data import ByteTokenizer

    bt = ByteTokenizer()
    assert bt.n_words == 260
    assert (bt.bos_id, bt.eos_id, bt.pad_id, bt.eot_id) == (256, 257, 258, 259)
    assert bt.decode([bt.bos_id, 104, 105, bt.eos_id]) == "<|begin_of_text|>hi<|end_of_text|>"
    assert bt.encode("<|eot_id|>", bos=False, eos=False) == list(b"<|eot_id|>")  # text, not the special id
    assert bt.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence
    with pytest.raises(ValueError, match="260"):
        bt.decode([260])


def test_load_tokenizer_selects_bytes_or_a_tiktoken_file():
    from fedtp_flwr.data import ByteTokenizer, load_tokenizer

    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(load_tokenizer(None), Tokenizer) and isinstance(load_tokenizer(""), Tokenizer)


def test_bytes_small_preset_matches_the_byte_tokenizer():
    from fedtp_flwr.data import ByteTokenizer
    from fedtp_flwr.model import preset_args

    assert preset_args("bytes-small").vocab_size == ByteTokenizer().n_words


def test_server_refuses_a_model_smaller_than_the_tokenizer(tmp_path):
    from fedtp_flwr.config import ConfigError
    from fedtp_flwr.server.app import run
    from fedtp_flwr.testing.inprocess import InProcessGrid

    cfg = {"model": "bytes-small", "tokenizer-path": "", "output-dir": str(tmp_path), "num-server-rounds": 1}
    with pytest.raises(ConfigError, match="tokenizer-path.*128256.*vocab_size 260"):
        run(InProcessGrid([{"partition-id": 0, "num-partitions": 1}], cfg), cfg)
