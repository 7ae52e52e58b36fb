"""Built-in corpus: speeches from nine Shakespeare plays, one speech per line, one file per play.

train/ holds eight plays, eval/ a ninth (Macbeth), so evaluation is on text no client trains on. The
files are the output of `build_corpus.py` (see its docstring for the source and how to rebuild).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

SPLITS = ("train", "eval")


def builtin_corpus_path(split: str = "train") -> Path:
    """Directory of the built-in corpus's `split` ("train" or "eval"), for `load_examples`."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}, expected one of {', '.join(SPLITS)}")
    return Path(str(importlib.resources.files(__name__) / split))
