"""A tokenizer folder's own chat template (fedtp_flwr/data/template.py): chat data rendered as transformers'
`apply_chat_template` renders it, the loss on the answers only, and clear errors for templates whose answers
cannot be found. Small folders built here (tests/test_gguf.py does the same on the real SmolLM2 folder)."""

from __future__ import annotations

import json
import re

import pytest

from fedtp_flwr.data import Chat, DataError, encode_chat, encode_prompt, load_tokenizer
from fedtp_flwr.data.tokenizer import LLAMA3_CHAT_TEMPLATE
from fedtp_flwr.model.checkpoint import export_hf, load_checkpoint

transformers = pytest.importorskip("transformers")

try:
    from conftest import SMOL_SPECIALS, make_folder
except ImportError:  # collected as a package
    from tests.conftest import SMOL_SPECIALS, make_folder  # type: ignore

# SmolLM2-Instruct's template (ChatML with a default system prompt), as its GGUF file carries it
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOL_CONFIG = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
               "unk_token": "<|endoftext|>"}
MESSAGES = [("system", "Be brief."), ("user", "What is the capital of Peru?"), ("assistant", "Lima."),
            ("user", "And of Spain?"), ("assistant", "The capital of Spain is Madrid.")]


def chatml_folder(path, template=CHATML, **config):
    return make_folder(path, specials=SMOL_SPECIALS, tokenizer_config={**SMOL_CONFIG, "chat_template": template,
                                                                       **config})


def as_dicts(messages):
    return [{"role": r, "content": c} for r, c in messages]


def answers_of(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_chatml_renders_as_transformers_does_with_the_loss_on_each_answer_and_its_end_of_turn(tmp_path):
    folder = chatml_folder(tmp_path / "hf")
    tok = load_tokenizer("", folder)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    multiline = [MESSAGES[1], ("assistant", "Lima.\n\n- a city\n  in Peru")]  # whitespace tokens in the answer
    for messages in (MESSAGES, MESSAGES[1:3], multiline):  # with a system prompt, and with the template's default
        ids, mask = encode_chat(Chat(tuple(messages), "s"), tok)
        assert ids == list(auto.apply_chat_template(as_dicts(messages), tokenize=True, return_dict=False))
        assert answers_of(tok, ids, mask) == "".join(c + "<|im_end|>" for r, c in messages if r == "assistant")
        want = auto.apply_chat_template(as_dicts(messages[:-1]), tokenize=True, return_dict=False,
                                        add_generation_prompt=True)
        assert encode_prompt(messages[:-1], tok) == list(want)
    # the newline ChatML writes after <|im_end|> is prompt: the model stops at <|im_end|>
    ids, mask = encode_chat(Chat(tuple(MESSAGES), "s"), tok)
    end = tok.special_tokens["<|im_end|>"]
    assert all(not mask[j + 1] for j, i in enumerate(ids[:-1]) if i == end)


def test_the_jinja_file_wins_and_a_list_of_named_templates_gives_its_default(tmp_path):
    folder = chatml_folder(tmp_path / "a", template=[{"name": "tool_use", "template": "{{ raise_exception('no') }}"},
                                                      {"name": "default", "template": CHATML}])
    tok = load_tokenizer("", folder)
    assert answers_of(tok, *encode_chat(Chat(tuple(MESSAGES), "s"), tok)).endswith("Madrid.<|im_end|>")
    (folder / "chat_template.jinja").write_text(CHATML.replace("<|im_end|>' + '\n'", "<|im_end|>'"))
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    ids, _ = encode_chat(Chat(tuple(MESSAGES), "s"), load_tokenizer("", folder))
    assert ids == list(auto.apply_chat_template(as_dicts(MESSAGES), tokenize=True, return_dict=False))
    assert "\n<|im_start|>" not in load_tokenizer("", folder).decode(ids)  # the file's template, not the config's
    bad = chatml_folder(tmp_path / "b", template=[{"name": "tool_use", "template": CHATML}])
    with pytest.raises(DataError, match=r"chat_template is neither a string nor a list .* \(names: \['tool_use'\]\)"):
        load_tokenizer("", bad)


def test_a_template_that_renders_earlier_turns_differently_is_refused(tmp_path):
    """Like templates that drop earlier reasoning: the conversation so far is not a prefix of the whole one."""
    drops = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] != 'assistant' or "
             "loop.last %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}")
    tok = load_tokenizer("", chatml_folder(tmp_path / "hf", template=drops))
    encode_chat(Chat(tuple(MESSAGES[:3]), "s"), tok)  # one answer: fine
    with pytest.raises(DataError, match=r"renders the conversation up to message 3 \(with the answer\) differently"):
        encode_chat(Chat(tuple(MESSAGES), "s"), tok)


def test_a_template_that_raises_or_escapes_its_sandbox_is_a_data_error_naming_the_folder(tmp_path):
    folder = chatml_folder(tmp_path / "a", template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=re.escape(f"{folder}: the chat template refused a conversation of roles "
                                                  "['user', 'assistant'] (TemplateError: roles must alternate)")):
        encode_chat(Chat((("user", "Hi"), ("assistant", "Hello")), "s"), load_tokenizer("", folder))
    folder = chatml_folder(tmp_path / "b", template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(DataError, match="SecurityError"):
        encode_chat(Chat((("user", "Hi"), ("assistant", "Hello")), "s"), load_tokenizer("", folder))
    folder = chatml_folder(tmp_path / "c", template="{% for m in messages %}")
    with pytest.raises(DataError, match=re.escape(f"{folder}: the chat template does not compile")):
        load_tokenizer("", folder)


def test_the_llama3_template_and_the_built_in_llama3_rendering_agree_on_ids_and_mask(tmp_path):
    """An exported folder carries LLAMA3_CHAT_TEMPLATE; read back, chat data goes through the template, and the
    ids and the loss mask are those the folder without a template gave (the Llama 3 rendering)."""
    folder = make_folder(tmp_path / "hf", tokenizer_config={"bos_token": "<|begin_of_text|>",
                                                             "eos_token": "<|eot_id|>"})
    plain = load_tokenizer("", folder)
    assert plain.chat_template is None
    args, state = load_checkpoint(folder)
    export_hf(state, args, tmp_path / "out", tokenizer=plain)
    templated = load_tokenizer("", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3_CHAT_TEMPLATE
    assert templated.chat_template is not None
    for messages in (MESSAGES, MESSAGES[1:3]):
        assert encode_chat(Chat(tuple(messages), "s"), templated) == encode_chat(Chat(tuple(messages), "s"), plain)
        assert encode_prompt(messages[:-1], templated) == encode_prompt(messages[:-1], plain)


def test_an_export_keeps_the_folders_own_template_file(tmp_path):
    folder = chatml_folder(tmp_path / "hf")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").write_text(config.pop("chat_template"))  # as transformers 5 saves it
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer("", folder)
    args, state = load_checkpoint(folder)
    export_hf(state, args, tmp_path / "out", tokenizer=tok)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHATML
    assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids, _ = encode_chat(Chat(tuple(MESSAGES), "s"), load_tokenizer("", tmp_path / "out"))
    assert ids == list(auto.apply_chat_template(as_dicts(MESSAGES), tokenize=True, return_dict=False))
