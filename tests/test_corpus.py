"""The built-in corpus: present, about 1 MB of speeches, one file per play, train and eval disjoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtp_flwr.data import builtin_corpus_path, load_examples, partition_examples
from fedtp_flwr.data.corpus.build_corpus import EVAL_PLAYS, TRAIN_PLAYS, speeches


def test_corpus_files_exist_one_per_play():
    for split, plays in (("train", TRAIN_PLAYS), ("eval", EVAL_PLAYS)):
        names = sorted(p.name for p in builtin_corpus_path(split).iterdir() if p.is_file())
        assert names == sorted(f"{play.split('/')[1]}.jsonl" for play in plays)


def test_corpus_sizes():
    size = {s: sum(p.stat().st_size for p in builtin_corpus_path(s).glob("*.jsonl")) for s in ("train", "eval")}
    assert 700_000 < size["train"] < 1_100_000
    assert 50_000 < size["eval"] < 200_000
    train, held_out = load_examples(builtin_corpus_path("train")), load_examples(builtin_corpus_path("eval"))
    assert len(train) > 5_000 and len(held_out) > 500


def test_train_and_eval_are_disjoint():
    train, held_out = load_examples(builtin_corpus_path("train")), load_examples(builtin_corpus_path("eval"))
    assert not {e.source for e in train} & {e.source for e in held_out}
    assert {e.source for e in held_out} == {"macbeth"}
    common = {e.text for e in train} & {e.text for e in held_out}
    assert all(len(text) < 40 for text in common), common  # only stock lines like "ROSS: Ay, my lord."


def test_every_line_is_a_clean_speech():
    for split in ("train", "eval"):
        for example in load_examples(builtin_corpus_path(split)):
            speaker, sep, text = example.text.partition(": ")
            assert sep and speaker and text, example
            assert not set(example.text) & set("*_#[]\\`"), example


def test_by_source_partition_of_the_corpus_gives_each_client_whole_plays():
    train = load_examples(builtin_corpus_path("train"))
    parts = [partition_examples(train, i, 4, seed=0, scheme="by-source") for i in range(4)]
    assert [len({e.source for e in p}) for p in parts] == [2, 2, 2, 2]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # flwr's use of pathspec's older API
def test_corpus_files_are_carried_by_flower_app_bundles():
    """`flwr run` ships the app as a FAB, which keeps only some file types (.jsonl yes, .txt no)."""
    include = pytest.importorskip("flwr.common.constant").FAB_INCLUDE_PATTERNS
    spec = pytest.importorskip("flwr.cli.utils").build_pathspec(include)
    root = Path(__file__).resolve().parents[1]
    for split in ("train", "eval"):
        for path in builtin_corpus_path(split).iterdir():
            assert spec.match_file(path.resolve().relative_to(root).as_posix()), path


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown corpus split 'test'"):
        builtin_corpus_path("test")


def test_markdown_conversion():
    markdown = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter two
Witches_

**First Witch**  
When shall we meet  
again?

_Exit Second Witch_

Alone now. _\\[Aside]_ \\--quiet.

**Second Witch**  
__\\[Within]_  
Anon.  
**First Witch**  
Hark!

### SCENE II. Elsewhere.

Nobody says this.
"""
    assert speeches(markdown) == [
        "First Witch: When shall we meet again? Alone now. --quiet.",
        "Second Witch: Anon.",
        "First Witch: Hark!",
    ]
