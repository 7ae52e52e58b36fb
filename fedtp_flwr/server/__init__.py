"""What the ServerApp runs.

    app.py          the run: initial model, strategy, outputs (`run`, called by server_app.py)
    strategy.py     the Flower Strategy: a slice per node, the round loop, the inner rule applied
    round.py        one round's replies: checked, folded in or parked, merged (TrainRound; start and
                    aggregate_train drive the same one)
    outer.py        DiLoCo's outer Nesterov step (strategy = "diloco")
    streaming.py    replies pulled one at a time as they arrive (pull.py on a real SuperLink)
    aggregation.py  the weighted merge of slices (WeightedFold), block by block
    robust.py       median / trimmed mean within a rank group; update norms and outliers
    replies.py      what a valid reply is (keys, shapes, dtypes, finite values, metrics)
    spill.py        replies that must wait, parked on disk
    outputs.py      results .pkl, per-round eval files, checkpoints
    memory.py       the ServerApp's peak memory per phase of a round
"""
