"""Check a run configuration before Flower sees it: every key and value, read the way `flwr run` reads them.

    python -m fedtp_flwr.tools.check_config --run-config 'world-size=4 learning-rate=3e-4 model="llama3.2-1b"'
    python -m fedtp_flwr.tools.check_config --run-config my-run.toml

Flower refuses a key that is not in pyproject.toml's [tool.flwr.app.config] before the app starts, and says only
"[code: 15] Invalid run configuration."; the app never sees the key, so it cannot name it. This command names it,
with the closest valid key, and checks each value as the app will (type, allowed values, the rules that tie keys
together, the world size against the model preset). Exit status 0 and "OK: N keys" when the app would accept the
configuration; 1 and one line per problem when not.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as Flower uses it
    import tomli as tomllib

from fedtp_flwr.compat import parse_config_args
from fedtp_flwr.config import ConfigError, RunConfig, unknown_key

# flwr 1.42's pattern for one key=value pair of --run-config (flwr/common/config.py, parse_config_args): text that
# is not such a pair is skipped by Flower without a word.
PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def read_run_config(specs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The overrides `flwr run --run-config SPEC ...` would send (Flower's own parser), and the problems with the
    text itself: a part that is not key=value (Flower skips it), a value that is not TOML."""
    problems = []
    for spec in specs:
        if spec.endswith(".toml"):
            continue
        skipped = PAIR.sub(" ", spec).split()
        if skipped:
            problems.append(f"{' '.join(skipped)!r} is not key=value: Flower would skip it")
    try:
        return parse_config_args(specs), problems
    except Exception as e:  # noqa: BLE001 - click's "invalid format", a .toml file that is not TOML or is missing
        for k, v in (pair for spec in specs for pair in PAIR.findall(spec)):
            try:
                tomllib.loads(f"{k} = {v}")
            except tomllib.TOMLDecodeError:
                hint = f' (a string needs quotes: {k}="{v}")' if v[:1] not in "\"'" else ""
                problems.append(f"{k}={v}: the value is not TOML{hint}")
        if not problems:
            problems.append(str(getattr(e, "message", e)))
        return {}, problems


def check(overrides: dict[str, Any]) -> list[str]:
    """Problems with these run-config overrides, one line each (empty: the app accepts them)."""
    known = RunConfig.keys()
    problems = [unknown_key(k) for k in sorted(set(overrides) - set(known))]
    try:
        cfg = RunConfig.from_run_config({k: v for k, v in overrides.items() if k in known})
    except ConfigError as e:
        return problems + [str(e)]
    if not cfg.checkpoint_dir and not cfg.resume_from:  # a preset: its shapes are known here, nothing to read
        from fedtp_flwr.model import preset_args
        from fedtp_flwr.model.sharding import check_world_size

        try:
            args = preset_args(cfg.model)
        except ValueError as e:
            return problems + [f"config key 'model': {e}"]
        try:
            check_world_size(args, cfg.world_size, cfg.vocab_parallel)
        except ValueError as e:
            problems.append(f"config key 'world-size': {e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-config", action="append", default=[], metavar="SPEC",
                   help="'key=value ...' (values in TOML: strings quoted) or a .toml file, as for flwr run; "
                        "may be repeated")
    a = p.parse_args(argv)
    overrides, problems = read_run_config(a.run_config)
    problems += check(overrides)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"OK: {len(overrides)} key{'' if len(overrides) == 1 else 's'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
