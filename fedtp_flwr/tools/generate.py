"""Try a fine-tuned model: print a completion of a prompt (greedy, or top-p sampling).

    python -m fedtp_flwr.tools.generate outputs/checkpoints/llama32_tiny_ws2_lr0.001_round3.pth --prompt "Shall I"
    python -m fedtp_flwr.tools.generate path/to/hf-or-meta-folder --chat --prompt "What is the capital of Peru?"
    python -m fedtp_flwr.tools.generate <checkpoint> --prompt "Once" --top-p 0.9 --temperature 0.6 --seed 1

A run checkpoint (.pth) brings its own model args and the run's tokenizer (its tokenizer-path /
checkpoint-dir settings); a Meta or Hugging Face folder brings its tokenizer if it has one (else Llama 3's);
--tokenizer overrides either. --chat wraps the prompt as the alpaca and chat data formats train it: in the
tokenizer folder's own chat template when it has one, else in the Llama 3 chat format; generation stops at
the tokenizer's stop tokens (<|eot_id|>, or the folder's end of turn such as SmolLM2's <|im_end|>). The
model has no KV cache (it is built for training), so each new token reruns the whole (at most max_seq_len)
window: fine for trying a model, not for serving it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from fedtp_flwr.data import encode_prompt, load_tokenizer
from fedtp_flwr.model import ModelArgs, Transformer
from fedtp_flwr.model.checkpoint import load_model
from fedtp_flwr.server.outputs import load_run_checkpoint
from fedtp_flwr.training import resolve_device


def load_for_generation(path: str | Path, tokenizer_path: Optional[str] = None, device="cpu"):
    """(model in eval mode, tokenizer) from a run checkpoint .pth or a Meta / Hugging Face folder."""
    path = Path(path)
    if path.is_dir():
        model = load_model(path, device=device)
        tokenizer = load_tokenizer(tokenizer_path or None, path)
    else:
        ckpt = load_run_checkpoint(path)
        config = ckpt["config"]
        args = ModelArgs.from_params(json.loads(config["model-args"]))
        with torch.device("meta"):
            model = Transformer(args)
        model.load_state_dict({k: v.to(device, torch.float32) for k, v in ckpt["model_state_dict"].items()},
                              strict=True, assign=True)
        tokenizer = load_tokenizer(tokenizer_path or config.get("tokenizer-path") or None,
                                   config.get("checkpoint-dir") or None)
    if tokenizer.n_words > model.args.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer!r} has {tokenizer.n_words} ids, more than the model's "
                         f"vocab_size {model.args.vocab_size} (pass the run's tokenizer with --tokenizer)")
    return model.eval(), tokenizer


def sample_top_p(logits: torch.Tensor, top_p: float, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> int:
    """A token drawn from the smallest set of most likely tokens whose probability reaches top_p
    (nucleus sampling), after dividing the logits [vocab] by temperature."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before a token already reaches top_p
    sorted_probs[outside] = 0.0
    pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[pick])


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int], max_new_tokens: int, stop_tokens: Sequence[int] = (),
             top_p: Optional[float] = None, temperature: float = 1.0, seed: int = 0) -> list[int]:
    """The new token ids after `prompt` (greedy, or top-p sampling when top_p is given), ending before
    the first stop token or after max_new_tokens."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids, new = list(prompt), []
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-model.args.max_seq_len:]], device=device)
        logits = model(window)[0, -1].cpu()
        token = int(logits.argmax()) if top_p is None else sample_top_p(logits, top_p, temperature, generator)
        if token in stop_tokens:
            break
        ids.append(token)
        new.append(token)
    return new


def prompt_ids(tokenizer, prompt: str, chat: bool, system: Optional[str] = None) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt, bos=True, eos=False)
    return encode_prompt(([("system", system)] if system else []) + [("user", prompt)], tokenizer)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pth written by a fedtp-flwr run, or a Meta / Hugging Face folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer folder's chat template (else Llama 3's)")
    p.add_argument("--system", help="a system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-p", type=float, help="sample from this nucleus (default: greedy)")
    p.add_argument("--temperature", type=float, default=0.6, help="with --top-p (default 0.6, Llama 3's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer.json, tokenizer.model or 'bytes' (default: the checkpoint's)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.top_p is not None and not (0 < a.top_p <= 1 and a.temperature > 0):
        p.error(f"--top-p must be in (0, 1] and --temperature > 0, got {a.top_p} and {a.temperature}")
    model, tokenizer = load_for_generation(a.checkpoint, a.tokenizer, resolve_device(a.device))
    ids = prompt_ids(tokenizer, a.prompt, a.chat, a.system)
    new = generate(model, ids, a.max_new_tokens, tokenizer.stop_tokens, a.top_p, a.temperature, a.seed)
    print(tokenizer.decode(new))


if __name__ == "__main__":
    main()
