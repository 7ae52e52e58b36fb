"""Instruction and chat records, rendered in a chat format with a loss mask on the responses.

Two JSONL record shapes (one JSON object a line):

- alpaca: `{"instruction": str, "input": str (optional), "output": str}` -> one user turn (the instruction,
  then a blank line and the input when there is one) and one assistant turn (the output);
- chat: `{"messages": [{"role": "system" | "user" | "assistant" | "ipython" | "tool", "content": str}, ...]}`
  with at least one assistant message.

Either may carry a string "source" for non-IID partitioning, as text records do.

When the tokenizer's folder has its own chat template (`HFTokenizer.chat_template`: SmolLM2's ChatML, a
Llama 3.x Instruct template, ...), a record is rendered with it, as transformers' `apply_chat_template`
renders it (`template.py`). The loss then counts, for each assistant message, the tokens it adds to the
rendering after the conversation before it and the generation prompt, up to and including its last stop
token (ChatML: the answer and <|im_end|>, not the newline after it). A template that renders the
conversation so far differently from the start of the whole one (one that drops earlier reasoning, say) is
refused: the answer tokens could not be told apart.

Otherwise (the built-in tiktoken tokenizer, or a folder without a template) a record becomes

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ... (each message)

with the header and end-of-turn tokens as their special ids (never as text; text that spells them stays
text) and each content stripped, as Meta's Llama 3 template does. The loss counts every assistant
message's content and its <|eot_id|> (so the model learns to stop); the begin-of-text token, the system,
user and tool messages and every header are prompt (mask False).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError

ROLES = ("system", "user", "assistant", "ipython", "tool")
CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass(frozen=True)
class Chat:
    """One conversation: (role, content) pairs in order, and its source tag."""

    messages: tuple[tuple[str, str], ...]
    source: str


def _string(record: dict, key: str, where: str, *, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if key not in record and required:
        raise DataError(f'{where}: missing "{key}" key (the object has {len(record)} other key(s))')
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    return value


def parse_alpaca(record: dict, where: str, source: str) -> Chat:
    """An Alpaca record (instruction, optional input, output) as a user + assistant conversation."""
    instruction, output = _string(record, "instruction", where), _string(record, "output", where)
    extra = _string(record, "input", where, required=False)
    if not instruction.strip():
        raise DataError(f'{where}: "instruction" is empty')
    if not output.strip():
        raise DataError(f'{where}: "output" is empty (there would be nothing to learn)')
    prompt = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
    return Chat((("user", prompt), ("assistant", output.strip())), source)


def parse_chat(record: dict, where: str, source: str) -> Chat:
    """A chat record: "messages", a list of {"role", "content"} objects with at least one assistant turn."""
    if "messages" not in record:
        raise DataError(f'{where}: missing "messages" key (the object has {len(record)} other key(s))')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else type(messages).__name__
        raise DataError(f'{where}: "messages" must be a non-empty list, got {got}')
    out = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise DataError(f'{where}: message {i} must be an object with "role" and "content", got {type(m).__name__}')
        role, content = _string(m, "role", f"{where}: message {i}"), _string(m, "content", f"{where}: message {i}")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has an unknown role (allowed: {', '.join(ROLES)})")
        out.append((role, content.strip()))
    if not any(role == "assistant" and content for role, content in out):
        raise DataError(f"{where}: no assistant message with content (there would be nothing to learn)")
    return Chat(tuple(out), source)


def chat_token_ids(tokenizer) -> dict[str, int]:
    """The ids of CHAT_TOKENS in `tokenizer`; an error naming the tokenizer and what it lacks."""
    special = getattr(tokenizer, "special_tokens", {})
    missing = [name for name in CHAT_TOKENS if name not in special]
    if missing:
        raise DataError(f"instruction and chat data are rendered in the Llama 3 chat format when the tokenizer's "
                        f"folder has no chat template, but the tokenizer {tokenizer!r} has no special token(s) "
                        f"{missing}; use a Llama 3 tokenizer, a tokenizer folder with a chat template, or plain "
                        f"text data")
    return {name: special[name] for name in CHAT_TOKENS}


def header_ids(tokenizer, role: str) -> list[int]:
    """<|start_header_id|>{role}<|end_header_id|>\\n\\n as ids."""
    ids = chat_token_ids(tokenizer)
    return [ids["<|start_header_id|>"], *tokenizer.encode(role, bos=False, eos=False), ids["<|end_header_id|>"],
            *tokenizer.encode("\n\n", bos=False, eos=False)]


def _blank_line_then(tokenizer, content: str) -> tuple[list[int], list[int]]:
    """("\\n\\n", content) as ids, encoded together as transformers encodes a rendered chat template (the text
    between two special tokens is one piece), split where the blank line ends; separately when one token
    spans both (no tokenizer tested here does that). For Llama 3 both ways give the same ids."""
    together = tokenizer.encode("\n\n" + content, bos=False, eos=False)
    for k in (1, 2):
        if tokenizer.decode(together[:k]) == "\n\n":
            return together[:k], together[k:]
    return tokenizer.encode("\n\n", bos=False, eos=False), tokenizer.encode(content, bos=False, eos=False)


def encode_chat(chat: Chat, tokenizer) -> tuple[list[int], list[bool]]:
    """(token ids, mask): mask[i] is True when token i is a response token the loss counts. Rendered with the
    tokenizer folder's chat template when it has one, else in the Llama 3 format (the module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        return _encode_with_template(chat, template, set(tokenizer.stop_tokens))
    special = chat_token_ids(tokenizer)
    ids, mask = [tokenizer.bos_id], [False]
    for role, content in chat.messages:
        blank, body = _blank_line_then(tokenizer, content.strip())
        head = [special["<|start_header_id|>"], *tokenizer.encode(role, bos=False, eos=False),
                special["<|end_header_id|>"], *blank]
        body = body + [special["<|eot_id|>"]]
        ids += head + body
        mask += [False] * len(head) + [role == "assistant"] * len(body)
    return ids, mask


def _encode_with_template(chat: Chat, template, stops: set[int]) -> tuple[list[int], list[bool]]:
    """The whole conversation's ids; each answer found as text (what its message adds to the rendering after
    the conversation before it and the generation prompt), then as the tokens that start in it (and one that
    straddles its start), up to its last stop token. As text, not as token prefixes: a prompt that ends in
    a blank line may be one token alone and two before the answer (GPT-2's pre-tokenizer splits "\\n\\nLima")."""
    messages = list(chat.messages)
    rendered = template.render(messages, False)
    text = template.text(rendered)
    ids, spans = template.encode_rendered(rendered)
    mask = [False] * len(ids)

    def prefix_length(i: int, with_answer: bool) -> int:  # i: the assistant message's index
        part = template.text(template.render(messages[:i + with_answer], add_generation_prompt=not with_answer))
        if not text.startswith(part):
            what = "(with the answer)" if with_answer else "(its prompt)"
            raise DataError(
                f"the chat template of {template.where} renders the conversation up to message {i + 1} "
                f"{what} differently from how it renders the start of the whole conversation, so the answer's "
                f"tokens cannot be told apart (roles: {[r for r, _ in messages]})")
        return len(part)

    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        start, end = prefix_length(i, with_answer=False), prefix_length(i, with_answer=True)
        answer = [j for j, (a, b) in enumerate(spans) if start <= a < end or a < start < b]
        last = next((j for j in reversed(answer) if ids[j] in stops), None)
        for j in answer if last is None else [j for j in answer if j <= last]:
            mask[j] = True
    return ids, mask


def encode_prompt(messages: list[tuple[str, str]], tokenizer) -> list[int]:
    """A conversation so far, then the assistant header: what a model answers (generation)."""
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        return template.ids(list(messages), add_generation_prompt=True)
    ids, _ = encode_chat(Chat(tuple(messages), ""), tokenizer) if messages else ([tokenizer.bos_id], [])
    return ids + header_ids(tokenizer, "assistant")
