"""A tokenizer folder's own chat template, rendered as transformers' `apply_chat_template` renders it.

A Hugging Face folder may carry a Jinja chat template (`chat_template.jinja`, which wins, or the
"chat_template" of `tokenizer_config.json`: a string, or a list of {"name", "template"} whose "default" is
used). It is rendered in the sandbox transformers builds (`utils/chat_template_utils.py`, transformers 5.x):
an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension and the
`{% generation %}` tag, a `tojson` filter that keeps non-ASCII text, and the globals raise_exception,
strftime_now, dict and namespace; its variables are the messages, add_generation_prompt, tools and
documents (None) and the folder's named special tokens (bos_token, eos_token, ...).

Special-token text inside a message stays text, as everywhere in this package: before rendering, every
occurrence in a message is wrapped in private-use markers; after rendering, the marked pieces are encoded as
plain text and the rest (what the template wrote) with its special tokens. That is transformers'
`apply_chat_template(..., sanitize_control_tokens=True)`; for messages without such text, the ids are those of
its default as well.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import DataError

TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_START, _END = "\ue000", "\ue001"  # private-use markers around special-token text from a message


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Dict:
    """`dict(...)` without attribute access to the class (transformers' TemplateDict)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names (transformers' TemplateNamespace)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_Dict(), namespace=_Namespace)
    return env


def read_chat_template(folder: Path, tokenizer_config: dict) -> Optional[str]:
    """The folder's chat template source: chat_template.jinja, else tokenizer_config.json's; None if neither."""
    path = folder / TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a readable text file ({type(e).__name__})") from None
    source = tokenizer_config.get("chat_template")
    if source is None or isinstance(source, str):
        return source or None
    listed = source if isinstance(source, list) else []
    named = {t.get("name"): t.get("template") for t in listed if isinstance(t, dict)}
    if not isinstance(named.get("default"), str):
        raise DataError(f"{folder / 'tokenizer_config.json'}: its chat_template is neither a string nor a list of "
                        f'{{"name", "template"}} with a "default" one (names: {sorted(map(str, named))})')
    return named["default"]


Encoder = Callable[[str], tuple[list[int], list[tuple[int, int]]]]  # text -> (ids, (start, end) of each in text)


class ChatTemplate:
    """A compiled chat template and the tokenizer's two ways to encode: `encode` reads the special tokens in the
    text as their ids, `encode_plain` encodes text as text. `render` gives the template's text, `encode_rendered`
    its ids and where each token is in `text(rendered)` (the text without markers); `ids` does both."""

    def __init__(self, source: str, where: str, special_tokens_map: dict[str, str], special_tokens: Iterable[str],
                 encode: Encoder, encode_plain: Encoder):
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"{where}: the chat template does not compile ({type(e).__name__}: {e})") from None
        self.where = where
        self.special_tokens_map = dict(special_tokens_map)
        longest_first = sorted(special_tokens, key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self._marked = re.compile(f"{_START}({self._specials.pattern}){_END}|[{_START}{_END}]")
        self._encode, self._encode_plain = encode, encode_plain

    def _mark(self, text: str) -> str:
        text = text.replace(_START, "").replace(_END, "")
        return self._specials.sub(lambda m: f"{_START}{m.group(0)}{_END}", text)

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
        """The template's text of `messages`, special-token text in them marked (see the module docstring)."""
        chat = [{"role": role, "content": self._mark(content)} for role, content in messages]
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens_map)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"{self.where}: the chat template refused a conversation of roles "
                            f"{[r for r, _ in messages]} ({type(e).__name__}: {e})") from None

    def text(self, rendered: str) -> str:
        """The rendered text without its markers (what the ids spell)."""
        return "".join(piece or "" for piece in self._marked.split(rendered))

    def encode_rendered(self, rendered: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, (start, end) of each token in text(rendered)): the template's special tokens as their ids, the
        marked text from the messages as text."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        at = 0
        for i, piece in enumerate(self._marked.split(rendered)):  # [text, marked token or None, text, ...]
            if piece:
                piece_ids, piece_spans = (self._encode_plain if i % 2 else self._encode)(piece)
                ids += piece_ids
                spans += [(at + start, at + end) for start, end in piece_spans]
                at += len(piece)
        return ids, spans

    def ids(self, messages: list[tuple[str, str]], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered `messages`."""
        return self.encode_rendered(self.render(messages, add_generation_prompt))[0]
