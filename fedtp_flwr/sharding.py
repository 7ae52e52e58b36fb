"""Public names kept from before the package was grouped by who runs the code (docs/architecture.md): the plan lives in
`fedtp_flwr.model.sharding`, the merge in `fedtp_flwr.server.aggregation`. Nothing inside the package imports
this module, so a ClientApp that uses `shard` never loads the server's merge code."""

from fedtp_flwr.model.sharding import (
                                       REPLICATE,
                                       SHARDING_PLAN,
                                       Split,
                                       check_world_size,
                                       full_shapes,
                                       rule_for,
                                       shard,
                                       shard_args,
                                       slice_shapes,
                                       split_fraction,
                                       valid_world_sizes,
)
from fedtp_flwr.server.aggregation import merge

__all__ = ["REPLICATE", "SHARDING_PLAN", "Split", "check_world_size", "full_shapes", "merge", "rule_for", "shard",
           "shard_args", "slice_shapes", "split_fraction", "valid_world_sizes"]
