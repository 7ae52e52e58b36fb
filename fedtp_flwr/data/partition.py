"""Split examples among federated clients.

- "iid": shuffle all examples with `seed`, then cut into `num_partitions` contiguous parts whose sizes
  differ by at most one. Every example is in exactly one partition.
- "by-source": non-IID. The distinct `source` tags (for the built-in corpus: plays) are shuffled with
  `seed` and dealt round-robin, so partitions hold disjoint sets of whole sources. Needs at least as
  many sources as partitions.
"""

from __future__ import annotations

import random
from typing import Sequence

from .errors import DataError
from .files import Example

SCHEMES = ("iid", "by-source")


def partition_examples(
    examples: Sequence[Example], partition_id: int, num_partitions: int, *, seed: int = 0, scheme: str = "iid"
) -> list[Example]:
    """The examples of partition `partition_id` out of `num_partitions`, in their original order."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in 0..{num_partitions - 1}, got {partition_id}")
    rng = random.Random(seed)
    if scheme == "iid":
        order = list(range(len(examples)))
        rng.shuffle(order)
        n = len(order)
        mine = order[partition_id * n // num_partitions : (partition_id + 1) * n // num_partitions]
        detail = ""
    elif scheme == "by-source":
        sources = sorted({e.source for e in examples})
        rng.shuffle(sources)
        my_sources = set(sources[partition_id::num_partitions])
        mine = [i for i, e in enumerate(examples) if e.source in my_sources]
        detail = f" from {len(sources)} sources (by-source needs at least one source per partition)"
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}, expected one of {', '.join(SCHEMES)}")
    if not mine:
        raise DataError(
            f"partition {partition_id} of {num_partitions} has no examples "
            f"({scheme} split of {len(examples)} examples{detail})"
        )
    return [examples[i] for i in sorted(mine)]
