"""The one door to names that Flower and torchao do not promise to keep.

Everything here is a private or internal name of a library (a leading underscore, a protobuf module, an
object format, an attribute a class sets on itself), used because no public call does the job (the reasons
are next to each). No other module of the package touches such a name: an upgrade that moves one breaks this
module and its test (`tests/test_compat.py`, one quick test per name, against the installed library), not a
deployed round.

The versions this was written against are checked when the module is imported; anything else is refused with
the supported range. To try a new version: install it, run `python -m pytest -q tests/test_compat.py`, then
the whole suite; widen SUPPORTED (and pyproject.toml) only when both pass.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import metadata as _metadata
from typing import Any

# distribution -> (lowest supported version, first unsupported version): the minor series it was written for.
SUPPORTED = {"flwr": ("1.42", "1.43"), "torchao": ("0.18", "0.19")}


def _minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string ("1.42.0", "0.18.0+cu126", "1.43.0rc1")."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def check_version(dist: str, installed: str | None = None) -> None:
    """Refuse an installed `dist` outside SUPPORTED, naming the range (`installed=None`: ask importlib;
    torchao may be absent: it is only needed for the low-bit optimizers, which say so when chosen)."""
    low, high = SUPPORTED[dist]
    if installed is None:
        try:
            installed = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            if dist == "torchao":
                return
            raise ImportError(f"fedtp-flwr needs {dist} >= {low}, < {high}; it is not installed") from None
    if not _minor(low) <= _minor(installed) < _minor(high):
        raise ImportError(
            f"fedtp-flwr supports {dist} >= {low}, < {high}, but {dist} {installed} is installed: "
            f"pip install '{dist}>={low},<{high}' (fedtp_flwr/compat.py says how to check a new version)")


for _dist in SUPPORTED:
    check_version(_dist)

# ------------------------------------------------------------------------------------------------- Flower
# Imported after the version check, so that a moved name cannot hide the check's clearer message.
from flwr.app import Metadata  # noqa: E402
from flwr.app.message import make_message  # noqa: E402  - builds a Message with given metadata (reply stand-ins)
from flwr.common.config import parse_config_args  # noqa: E402  - how `flwr run --run-config` reads its overrides
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # noqa: E402  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # noqa: E402  # pylint: disable=E0611
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean  # noqa: E402
from flwr.supercore.constant import (  # noqa: E402
    HEAD_BODY_DIVIDER,
    PULL_BACKOFF_CAP,
    PULL_INITIAL_BACKOFF,
    PULL_MAX_TIME,
    SYSTEM_MESSAGE_TYPE,
)
from flwr.supercore.date import now  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_object_head_values_from_object_content  # noqa: E402
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import (  # noqa: E402
    ObjectPullError,
    ObjectUnavailableError,
    inflatable_class_registry,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.superlink.grid import HttpGrid  # noqa: E402

__all__ = [
    "ConfirmMessageReceivedRequest", "ErrorCode", "HttpGrid", "ObjectPullError", "ObjectUnavailableError",
    "PULL_BACKOFF_CAP", "PULL_INITIAL_BACKOFF", "PULL_MAX_TIME", "PullAppMessagesRequest", "SYSTEM_MESSAGE_TYPE",
    "SUPPORTED", "array_layout", "build_fab", "check_version", "ensure_run_identity", "fab_include_patterns",
    "inflatable_class", "make_message", "make_pull_object_fn_protobuf", "now", "object_body", "object_head",
    "MODEL_COPY", "restore_strategy_state", "runtime_client", "set_message_id", "snapshot_strategy_state",
    "strategy_baseline", "strategy_state", "load_strategy_state", "parse_config_args", "torchao_adamw", "trim_mean",
]


def runtime_client(grid: HttpGrid):
    """The Runtime API client of a deployment's grid (PullMessages, PullObject, ConfirmMessageReceived).
    Flower has no public call that inflates a reply one array at a time (server/pull.py), so the server makes
    the same calls HttpGrid makes, through HttpGrid's own client (a property that connects on first use)."""
    return grid._runtime_client  # noqa: SLF001


def set_message_id(metadata: Metadata, message_id: str) -> None:
    """Give a Message its id. Flower's Metadata exposes message_id read-only; its grids write the private field
    when they push, and so do we for a reply we inflated ourselves and for the in-process test grid."""
    metadata.__dict__["_message_id"] = message_id


def ensure_run_identity() -> None:
    """A Message needs a run id; Flower sets it per process for a ServerApp. Outside one (the in-process test
    grid) give it one, unless a run already did."""
    if TaskIdentity._run_id is None:  # noqa: SLF001
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


# Flower's object format (flwr.supercore.inflatable): each object is "<head><HEAD_BODY_DIVIDER><body>".


def object_head(content: bytes) -> tuple[str, list[str]]:
    """(object type, child object ids) of an object's serialized content."""
    obj_type, children, _ = get_object_head_values_from_object_content(content)
    return obj_type, list(children)


def object_body(content: bytes) -> memoryview:
    """The body of an object's content, without a copy."""
    return memoryview(content)[content.index(HEAD_BODY_DIVIDER) + len(HEAD_BODY_DIVIDER):]


def inflatable_class(obj_type: str):
    """The Flower class that inflates objects of this type (None: not an inflatable type)."""
    return inflatable_class_registry.get(obj_type)


def array_layout(body: memoryview | bytes, children: list[str]) -> tuple[str, tuple[int, ...], str, list[str]]:
    """(dtype, shape, stype, chunk ids in data order) of an Array object's body (JSON); the chunk order may
    repeat an id (equal chunks are stored once)."""
    meta = json.loads(bytes(body).decode("utf-8"))
    order = [children[i] for i in meta["arraychunk_ids"]]
    return str(meta["dtype"]), tuple(int(s) for s in meta["shape"]), str(meta["stype"]), order


def record_children(body: memoryview | bytes) -> dict[str, str]:
    """An ArrayRecord object's body: array name -> its Array's object id."""
    return dict(json.loads(bytes(body).decode("utf-8")))


def error_reply_metadata(grid: HttpGrid, run_id: int, reply_to: str) -> Metadata:
    """The metadata of a reply Flower's HttpGrid makes for one it could not pull: from the SuperLink's node, a
    system message replying to the original message."""
    return Metadata(run_id=run_id, message_id="", src_node_id=grid.node.node_id, dst_node_id=grid.node.node_id,
                    message_type=SYSTEM_MESSAGE_TYPE, group_id="", ttl=0, reply_to_message_id=reply_to,
                    created_at=now().timestamp())


# Flower's server-side rules keep their state between rounds in attributes they set on themselves (FedOpt: m_t, v_t;
# FedAvgM: momentum_vector), rebinding them to new objects each round. That state is found rather than listed, so that
# a rule keeping it under another name is checkpointed too: every attribute the rule has set or changed since it was
# built, except its copy of the global model, which configure_train sets from the model it is given (FedOpt every
# round, FedAvgM once), so a resumed rule gets it back from the resumed model.
MODEL_COPY = "current_arrays"


def strategy_baseline(strategy) -> dict[str, Any]:
    """The rule's attributes as built (a deep copy), for strategy_state to compare against."""
    return copy.deepcopy(vars(strategy))


def strategy_state(strategy, baseline: dict[str, Any]) -> dict[str, Any]:
    """The rule's state between rounds: every attribute set or changed since `baseline` (strategy_baseline of the rule
    as built), but MODEL_COPY. An attribute whose change `==` cannot decide (arrays) counts as changed."""
    return {name: value for name, value in vars(strategy).items()
            if name != MODEL_COPY and (name not in baseline or not _equal(value, baseline[name]))}


def _equal(a, b) -> bool:
    try:
        same = a == b
    except Exception:  # noqa: BLE001 - numpy's ambiguous truth value inside a container, or a type refusing ==
        return False
    return isinstance(same, bool) and same


def load_strategy_state(strategy, state: dict[str, Any]) -> None:
    """Set the rule's state (as strategy_state returns it). The model copy or a method or property of the rule's class
    is not state: an error."""
    for name, value in state.items():
        own = getattr(type(strategy), name, None)
        if name == MODEL_COPY or callable(own) or isinstance(own, property):
            raise ValueError(f"the checkpoint holds {name!r}, which is not state of Flower's {type(strategy).__name__}")
        setattr(strategy, name, value)


def snapshot_strategy_state(strategy) -> dict[str, Any]:
    """Everything the rule holds, shallowly (its rules rebind, so a shallow copy keeps the old state)."""
    return dict(vars(strategy))


def restore_strategy_state(strategy, snapshot: dict[str, Any]) -> None:
    vars(strategy).clear()
    vars(strategy).update(snapshot)


def fab_include_patterns() -> tuple[str, ...]:
    """The file patterns `flwr build` / `flwr run` put into a FAB (others are left out)."""
    from flwr.common.constant import FAB_INCLUDE_PATTERNS

    return tuple(FAB_INCLUDE_PATTERNS)


def build_fab(app_dir) -> bytes:
    """The FAB (a zip) `flwr run` would ship for the app in `app_dir` (tests list what it holds)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


# ------------------------------------------------------------------------------------------------ torchao


def torchao_adamw():
    """torchao's plain AdamW (float32 state) that takes bfloat16 weights with stochastic rounding: the class is
    private (`_AdamW`; torchao exports only the 8-bit / 4-bit / fp8 ones), and the only AdamW that updates
    bfloat16 weights without a float32 master copy. Imported when called: torchao compiles its step."""
    import torchao.optim

    return torchao.optim._AdamW  # noqa: SLF001
