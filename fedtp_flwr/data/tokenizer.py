"""Meta's Llama 3 tokenizer interface (`encode(s, bos, eos)`, `decode`, `bos_id`, ...) over tiktoken.

The vocabulary is 128,000 byte-level BPE ranks read from a `tokenizer.model` file (one "base64 rank"
pair a line) followed by 256 special tokens, 128256 ids in all. The special-token list is the one in
llama-models 0.3.0 (`llama_models/llama3/tokenizer.py`), which puts `<|image|>` at 128011 and numbers
the remaining reserved tokens from 2.

Special tokens are never produced from text: "<|eot_id|>" inside a string is encoded as the ordinary
characters it is made of. Only `bos` / `eos` add special ids.
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import json
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

import tiktoken

from .errors import DataError
from .template import SPECIAL_TOKEN_NAMES, TEMPLATE_FILE, ChatTemplate, read_chat_template

# Llama 3 pre-tokenizer: contractions, letter runs (with one leading non-letter), 1-3 digit groups,
# punctuation runs (with trailing newlines), newline runs, other whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",  # 128000
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # 128004: padding for fine-tuning
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # 128009: end of turn
    "<|python_tag|>",
    "<|image|>",  # 128011
)

# tiktoken is only safe on bounded inputs (Meta's reference splits the same way; tiktoken issue 195):
# at most this many characters per call ...
MAX_ENCODE_CHARS = 400_000
# ... and no run of whitespace or of non-whitespace longer than this (BPE cost grows with a run's length).
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")


def special_token_names() -> list[str]:
    """The 256 special tokens in id order (id = number of BPE ranks + index)."""
    n_reserved = NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS)
    return [*_NAMED_SPECIAL_TOKENS, *(f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved))]


def default_tokenizer_path() -> Path:
    """The Llama 3 `tokenizer.model` that the `llama-models` package ships."""
    try:
        package = importlib.resources.files("llama_models")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "no tokenizer path given and the llama-models package, which ships the default "
            "tokenizer.model, is not installed: pip install llama-models, or pass Tokenizer(path)"
        ) from None
    return Path(str(package / "llama3" / "tokenizer.model"))


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file. Unlike `tiktoken.load.load_tiktoken_bpe`, this keeps no cache copy
    in the temp dir keyed by path, which would go stale when the file at that path changes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read tokenizer file: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(
                f"{path}:{lineno}: not a tiktoken BPE file (expected 'base64-token rank', got a line of "
                f"{len(line.split())} field(s) that does not parse)"
            ) from None
    if not ranks:
        raise DataError(f"{path}: tokenizer file has no BPE ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: BPE ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def _split_long_runs(text: str) -> Iterator[str]:
    start = 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


def split_for_tiktoken(text: str) -> Iterator[str]:
    """Cut `text` into pieces tiktoken handles. Pieces of at most MAX_ENCODE_CHARS end, where possible,
    just before a space, which is where the pre-tokenizer would cut anyway, so ordinary text gets the
    same ids as one uncut encode; runs longer than MAX_RUN_CHARS are cut every MAX_RUN_CHARS."""
    start = 0
    while start < len(text):
        end = min(start + MAX_ENCODE_CHARS, len(text))
        if end < len(text):
            space = text.rfind(" ", start + 1, end)
            end = space if space > start else end
        yield from _split_long_runs(text[start:end])
        start = end


class Tokenizer:
    """Llama 3 tokenizer. `Tokenizer()` loads the file llama-models ships; pass `path` for your own."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_tokenizer_path()
        ranks = load_bpe_ranks(self.path)
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(
            name=self.path.name,
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = len(ranks) + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        """Token ids of `s`, with <|begin_of_text|> / <|end_of_text|> around it if asked. Any length."""
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        ids = [self.bos_id] if bos else []
        for piece in split_for_tiktoken(s):
            ids.extend(self.model.encode_ordinary(piece))  # special-token text stays ordinary text
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 on their own become U+FFFD."""
        return self.model.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, n_words={self.n_words})"


# Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then a few special tokens.
BYTE_SPECIAL_TOKENS = (
    "<|begin_of_text|>",  # 256
    "<|end_of_text|>",  # 257
    "<|finetune_right_pad_id|>",  # 258
    "<|eot_id|>",  # 259
)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus BYTE_SPECIAL_TOKENS (256..259): 260 ids, no file needed.

    The same interface as `Tokenizer`; for small models (CPU experiments, benchmarks), where a 128,256-way
    embedding and output layer would be nearly all of the model. Special-token text inside a string is
    encoded as its bytes, as `Tokenizer` does."""

    def __init__(self):
        self.special_tokens = {name: 256 + i for i, name in enumerate(BYTE_SPECIAL_TOKENS)}
        self.n_words: int = 256 + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.stop_tokens = [self.eos_id, self.eot_id]
        self._names = {i: name for name, i in self.special_tokens.items()}

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        ids = [self.bos_id] if bos else []
        ids.extend(s.encode("utf-8", errors="surrogatepass"))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: special ids as their names; bytes that are not valid UTF-8 become U+FFFD."""
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._names:
                raise ValueError(f"token id {i} is outside the byte tokenizer's 0..{self.n_words - 1}")
            parts.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            parts.append(self._names[i])
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        return f"ByteTokenizer(n_words={self.n_words})"


BYTES = "bytes"  # the tokenizer-path value that selects ByteTokenizer


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the maintained `tokenizers` library) behind the same interface.

    bos / eos / pad come from the folder the file is in, as transformers reads them: the tokens named in
    `tokenizer_config.json` (or `special_tokens_map.json`), else the ids in `config.json` /
    `generation_config.json`, else the special tokens of those roles by name (the Llama 3 names first,
    then `<s>`, `</s>`, `<pad>`, `<|endoftext|>`); pad falls back to eos. `stop_tokens` are eos, every
    eos id the configs list (Llama 3.x Instruct: 128001, 128008, 128009) and `<|eot_id|>` if present.
    As with the other tokenizers, special tokens are never produced from text: "<|eot_id|>" inside a
    string is encoded as the characters it is made of; `special_tokens` (name -> id) gives the real ids.

    `chat_template` is the folder's own chat template (`template.ChatTemplate`: chat_template.jinja or the
    one in tokenizer_config.json), None when it has none; chat data is then rendered with it (`chat.py`)."""

    _ROLES = {"bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"),
              "eos": ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"),
              "pad": ("<|finetune_right_pad_id|>", "<pad>")}

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a plain Exception for unreadable or malformed files
            raise DataError(f"{path}: not a readable tokenizer.json ({type(e).__name__})") from None
        self._tok.encode_special_tokens = True
        self.path = str(path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.n_words: int = max(vocab.values()) + 1  # ids are 0 .. n_words - 1 (a vocabulary may have holes)
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        named, ids = _folder_special_tokens(Path(path).parent)
        roles: dict[str, Optional[int]] = {}
        for role, fallback in self._ROLES.items():
            name = named.get(role)
            if name is not None and name not in vocab:
                raise DataError(f"{Path(path).parent}: the {role} token {name!r} of its configs is not in {path}")
            by_id = ids.get(role, [None])[0]
            roles[role] = vocab[name] if name is not None else by_id if by_id is not None else next(
                (vocab[n] for n in fallback if n in vocab), None)
        if roles["bos"] is None or roles["eos"] is None:
            raise DataError(f"{path}: no begin/end-of-text special token (none named in tokenizer_config.json or "
                            f"config.json beside it, and none of {self._ROLES['bos'] + self._ROLES['eos']})")
        for role, i in roles.items():
            if i is not None and not 0 <= i < self.n_words:
                raise DataError(f"{Path(path).parent}: {role} id {i} is outside the tokenizer's 0..{self.n_words - 1}")
        self.bos_id, self.eos_id = roles["bos"], roles["eos"]
        self.pad_id: int = roles["pad"] if roles["pad"] is not None else self.eos_id
        eot = self.special_tokens.get("<|eot_id|>")
        self.stop_tokens = list(dict.fromkeys(
            [self.eos_id, *(i for i in ids.get("eos", []) if 0 <= i < self.n_words), *([eot] if eot is not None else [])]))
        self.chat_template = self._read_chat_template(Path(path).parent)

    def _read_chat_template(self, folder: Path) -> Optional[ChatTemplate]:
        config = _read_config(folder / "tokenizer_config.json")
        source = read_chat_template(folder, config)
        if source is None:
            return None
        names = {**_read_config(folder / "special_tokens_map.json"), **config}  # as transformers merges them
        token_map = {key: _token_name(names.get(key)) for key in SPECIAL_TOKEN_NAMES}
        with_specials = None

        def encode_with_specials(text: str):  # a second tokenizer: the first keeps specials as text
            nonlocal with_specials
            if with_specials is None:
                from tokenizers import Tokenizer as _Tokenizer

                with_specials = _Tokenizer.from_str(self._tok.to_str())
                with_specials.encode_special_tokens = False
            encoding = with_specials.encode(text, add_special_tokens=False)
            return encoding.ids, encoding.offsets

        def encode_plain(text: str):
            encoding = self._tok.encode(text, add_special_tokens=False)
            return encoding.ids, encoding.offsets

        return ChatTemplate(source, str(folder), {k: v for k, v in token_map.items() if v is not None},
                            self.special_tokens, encode_with_specials, encode_plain)

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        return ([self.bos_id] if bos else []) + self._tok.encode(s, add_special_tokens=False).ids + (
            [self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        template = ", its own chat template" if self.chat_template is not None else ""
        return f"HFTokenizer({self.path!r}, n_words={self.n_words}{template})"


def _token_name(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    return data if isinstance(data, dict) else {}


def _folder_special_tokens(folder: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """({role: token name}, {role: [ids]}) for bos / eos / pad, from a Hugging Face folder's configs."""
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        config = _read_config(folder / file)
        for role in ("bos", "eos", "pad"):
            name = _token_name(config.get(f"{role}_token"))
            if name is not None:
                names[role] = name
    ids: dict[str, list[int]] = {}
    for file in ("generation_config.json", "config.json"):  # config.json wins
        config = _read_config(folder / file)
        for role in ("bos", "eos", "pad"):
            value = config.get(f"{role}_token_id")
            listed = value if isinstance(value, list) else [value]
            listed = [v for v in listed if isinstance(v, int) and not isinstance(v, bool)]
            if listed:
                ids[role] = listed
    return names, ids


TOKENIZER_FILES = ("tokenizer.json", "original/tokenizer.model", "tokenizer.model")  # in order of preference


def folder_tokenizer_path(folder: str | Path) -> Optional[Path]:
    """The tokenizer a checkpoint folder ships (first of TOKENIZER_FILES it holds), or None."""
    return next((Path(folder) / f for f in TOKENIZER_FILES if (Path(folder) / f).is_file()), None)


def load_tokenizer(path: str | Path | None = None,
                   checkpoint_dir: str | Path | None = None) -> Tokenizer | ByteTokenizer | HFTokenizer:
    """The run's tokenizer, from the `tokenizer-path` and `checkpoint-dir` config values:
    "bytes" -> ByteTokenizer(); a `.json` path -> HFTokenizer(path) (a Hugging Face tokenizer.json, its
    special tokens from the configs beside it); another path -> Tokenizer(path) (a tiktoken
    tokenizer.model). Empty: the checkpoint folder's own tokenizer (`folder_tokenizer_path`) when
    `checkpoint_dir` is given and has one, else the default Llama 3 tokenizer that llama-models ships."""
    if isinstance(path, str) and path == BYTES:
        return ByteTokenizer()
    if not path and checkpoint_dir:
        path = folder_tokenizer_path(checkpoint_dir)
    if path and str(path).endswith(".json"):
        return HFTokenizer(path)
    return Tokenizer(path or None)


HF_TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json", TEMPLATE_FILE)


# The Llama 3 chat template, rendering exactly what chat.encode_chat / encode_prompt do (transformers'
# apply_chat_template), for an exported tokenizer_config.json that has none.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def save_hf_tokenizer(tokenizer: Tokenizer | ByteTokenizer | HFTokenizer, out_dir: str | Path) -> list[str]:
    """Write `tokenizer` into a Hugging Face folder as tokenizer.json + tokenizer_config.json, so that
    `transformers.AutoTokenizer.from_pretrained(out_dir)` gives the same ids. A tokenizer.json is copied with
    the configs beside it; a tiktoken tokenizer.model is converted with transformers' TikTokenConverter
    (when transformers is installed), and a folder's chat_template.jinja is copied. A tokenizer with the
    Llama 3 chat tokens and no chat template of its own gets LLAMA3_CHAT_TEMPLATE (the format training used).
    Returns the names written ([] when the tokenizer cannot be written: the byte tokenizer, or tiktoken
    without transformers)."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {i: n for n, i in tokenizer.special_tokens.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names.get(tokenizer.bos_id),
              "eos_token": names.get(tokenizer.eos_id), "pad_token": names.get(tokenizer.pad_id)}
    if isinstance(tokenizer, HFTokenizer):
        src = Path(tokenizer.path)
        shutil.copyfile(src, out_dir / "tokenizer.json")
        written = ["tokenizer.json"] + [n for n in HF_TOKENIZER_CONFIGS if (src.parent / n).is_file()]
        for name in written[1:]:
            shutil.copyfile(src.parent / name, out_dir / name)
        if "tokenizer_config.json" in written:
            config = _read_config(out_dir / "tokenizer_config.json")
            written.remove("tokenizer_config.json")
    elif isinstance(tokenizer, Tokenizer):
        try:
            from transformers.convert_slow_tokenizer import TikTokenConverter
        except ImportError:
            return []
        TikTokenConverter(vocab_file=str(tokenizer.path), pattern=SPLIT_PATTERN,
                          extra_special_tokens=sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
                          ).converted().save(str(out_dir / "tokenizer.json"))
        written = ["tokenizer.json"]
    else:
        return []
    if ("chat_template" not in config and TEMPLATE_FILE not in written
            and all(t in tokenizer.special_tokens for t in _CHAT_TOKENS)):
        config["chat_template"] = LLAMA3_CHAT_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return written + ["tokenizer_config.json"]
