"""What a run writes: its own folder, the seed's output files in it, each written atomically (temp file in the
same folder, then rename), and its entry in the results file shared by the runs of the parent folder.

Every run has a folder of its own (`<output-dir>/run-<run id>`): nothing a run writes can replace what another
run wrote. A resumed run too: it writes into a new folder, linking the checkpoint it started from.

- run.json: what the run is and how it ended (status running / completed / failed and why, resumed-from);
- experiment_results_llama32.pkl: {(world_size, lr, enable_swapping, rounds, seed): [(round, loss, ppl)]},
  this run's entry, rewritten each round (read back with an unpickler that refuses every class: plain data
  only); the one in the parent folder merges the runs that completed there: a completed run's entry is added
  under a lock, never replacing a key another run wrote, and a failed run's never enters;
- eval_res_llama32_ws{W}_r{R}.txt: "Round: r, Loss: x, Perplexity: y" per line;
- checkpoints/llama32_{model}_ws{W}_lr{lr}_round{r}.pth: model_state_dict, experiment_key, round, config
  (read back with torch.load(weights_only=True));
- checkpoints/llama32_{model}_ws{W}_lr{lr}_best.pth: the trained round with the lowest held-out loss so far (a
  hard link to that round's checkpoint when it has one); its "round" says which;
- eval_res_llama32_ws{W}_r{R}.png beside the eval file when matplotlib is installed.

Crash safety: after each rename the folder itself is fsynced (so the rename survives a power cut), a run
removes the temp files a crashed run left behind when it starts, and keep-checkpoints bounds how many of
this run's checkpoints stay on disk.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

RESULTS_FILE = "experiment_results_llama32.pkl"
RUN_RECORD = "run.json"


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write(f)` into a temp file beside `path`, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; elsewhere the rename is as durable as the platform makes it)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The temp files atomic_write makes for this tool's outputs: ".<output name>.<random>.tmp".
_TEMP_FILE = re.compile(r"^\.(experiment_results_llama32\.pkl|run\.json|eval_res_llama32_.+|llama32_.+\.pth)\.[^.]+\.tmp$")


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads dicts, lists, tuples, numbers, strings and bools; refuses any class or function."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: results files hold plain data only")


def read_results(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        with open(path, "rb") as f:
            data = _PlainDataUnpickler(f).load()
    except Exception as e:
        raise ValueError(f"{path}: not a results file this tool wrote ({e}); move it away or pick another output-dir") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of experiments, found {type(data).__name__}")
    return data


def model_tag(model_name: str) -> str:
    """'llama3.2-3b' -> '3b' (the seed's file names); other names keep their own tag."""
    return model_name.removeprefix("llama3.2-").replace("/", "_")


def new_run_folder(parent: str | Path, name: str) -> Path:
    """parent/name, made now and empty: parent/name-2, -3, ... when a folder of that name exists already."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = parent / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free folder name for {name}")


def run_folders(parent: str | Path) -> list[Path]:
    """The run folders under `parent` (an output-dir), oldest first."""
    parent = Path(parent)
    found = [p for p in parent.glob("run-*") if p.is_dir()] if parent.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def link_or_copy_name(src: Path, dst: Path) -> str:
    """Make `dst` name the file `src`: a hard link (no second copy), else a symbolic link; how it was done."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "hard link"
    except OSError:
        os.symlink(src.resolve(), dst)
        return "symbolic link"


class RunOutputs:
    """Everything one run writes, under `output_dir` (its own folder); `results_dir` holds the results file
    merged across the runs that completed there (default: the run's own folder, which then is that file)."""

    def __init__(self, output_dir: str | Path, experiment_key: tuple, world_size: int, rounds: int, lr: float,
                 model_name: str, config: Mapping[str, Any], checkpoint_every: int = 1, keep_checkpoints: int = 0,
                 results_dir: str | Path | None = None):
        self.dir = Path(output_dir)
        self.results_dir = Path(results_dir) if results_dir is not None else self.dir  # the merged .pkl
        self.key = experiment_key
        self.world_size, self.rounds, self.lr = world_size, rounds, lr
        self.model_name, self.config = model_name, dict(config)
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints  # 0: all
        self.history: list[tuple[int, float, float]] = []

    @property
    def results_path(self) -> Path:
        """This run's results file: its entry only."""
        return self.dir / RESULTS_FILE

    @property
    def merged_results_path(self) -> Path:
        return self.results_dir / RESULTS_FILE

    @property
    def run_record_path(self) -> Path:
        return self.dir / RUN_RECORD

    @property
    def eval_path(self) -> Path:
        return self.dir / f"eval_res_llama32_ws{self.world_size}_r{self.rounds}.txt"

    def checkpoint_path(self, rnd: int) -> Path:
        return self.dir / "checkpoints" / f"llama32_{model_tag(self.model_name)}_ws{self.world_size}_lr{self.lr}_round{rnd}.pth"

    @property
    def best_checkpoint_path(self) -> Path:
        """The checkpoint of the trained round (>= 1) with the lowest held-out loss so far ("round" inside)."""
        return self.checkpoint_path(0).with_name(self.checkpoint_path(0).name.replace("_round0.pth", "_best.pth"))

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temp files a crashed run left behind (only names this tool's atomic writes use)."""
        removed = []
        for folder in (self.results_dir, self.dir, self.dir / "checkpoints"):
            if folder.is_dir():
                for p in folder.iterdir():
                    if _TEMP_FILE.match(p.name) and p.is_file():
                        p.unlink(missing_ok=True)
                        removed.append(p)
        return removed

    def start_from(self, history: list[tuple[int, float, float]], resumed_from: str | Path | None = None,
                   start_round: int | None = None) -> list[str]:
        """Resume: keep the rounds already recorded, and name in this run's folder the checkpoint it starts from
        (and the best one of the run it continues, when that is beside it), as links: the resumed run's folder
        is never written. Returns what was linked, for the log."""
        self.history = [tuple(h) for h in history]
        if resumed_from is None:
            return []
        linked = []
        src = Path(resumed_from).expanduser().resolve()
        pairs = [(src, self.checkpoint_path(start_round))] if start_round is not None else []
        src_best = src.with_name(self.best_checkpoint_path.name)
        if src_best.is_file():
            pairs.append((src_best, self.best_checkpoint_path))
        for a, b in pairs:
            if not b.exists():
                linked.append(f"{b.name} -> {a} ({link_or_copy_name(a, b)})")
        return linked

    def write_run_record(self, **fields: Any) -> None:
        """run.json: the fields given so far, updated (status, reason, ...)."""
        record = json.loads(self.run_record_path.read_text()) if self.run_record_path.exists() else {}
        record.update(fields)
        text = json.dumps(record, indent=1, default=str) + "\n"
        atomic_write(self.run_record_path, lambda f: f.write(text.encode()))

    def publish(self) -> str:
        """Add this completed run's entry to the merged results file, unless another run's entry holds its key
        (kept: the runs of one seed key differ in a setting the seed's key leaves out, such as the strategy).
        Under a lock, so runs finishing together both land. Says what happened, for the log."""
        if self.merged_results_path == self.results_path:
            return f"results in {self.results_path}"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with open(self.results_dir / f".{RESULTS_FILE}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = read_results(self.merged_results_path)
            if self.key in merged:
                return (f"{self.merged_results_path} already holds key {self.key} from another run and keeps it; "
                        f"this run's results are in {self.results_path}")
            merged[self.key] = list(self.history)
            atomic_write(self.merged_results_path, lambda f: pickle.dump(merged, f))
        return f"results added to {self.merged_results_path} (and in {self.results_path})"

    def record(self, rnd: int, loss: float, perplexity: float, state: Mapping[str, torch.Tensor] | None,
               extras: Mapping[str, Any] | None = None) -> None:
        """Round `rnd`'s results; with `state`, its checkpoint when one is due (holding `extras` too: what an
        exact resume needs beyond the model, as tensors and plain data)."""
        earlier = [h for h in self.history if h[0] < rnd]
        best = state is not None and rnd > 0 and math.isfinite(loss) and all(loss < h[1] for h in earlier if h[0] > 0)
        self.history = earlier + [(rnd, float(loss), float(perplexity))]
        results = {self.key: list(self.history)}
        atomic_write(self.results_path, lambda f: pickle.dump(results, f))
        text = "".join(f"Round: {r}, Loss: {l:.6f}, Perplexity: {p:.6f}\n" for r, l, p in self.history)
        atomic_write(self.eval_path, lambda f: f.write(text.encode()))
        saved = None
        if state is not None and rnd > 0 and self._checkpoint_due(rnd):
            saved = self.save_checkpoint(rnd, state, extras)
        if best:
            self._save_best(rnd, state, extras, saved)
        self._plot()

    def _save_best(self, rnd: int, state: Mapping[str, torch.Tensor], extras: Mapping[str, Any] | None,
                   saved: Path | None) -> None:
        """The best checkpoint: a hard link to the round's own checkpoint when it was just written (no second
        copy of the model on disk), else written in full; replaced atomically either way."""
        path = self.best_checkpoint_path
        if saved is not None:
            tmp = path.with_name(f".{path.name}.link.tmp")
            try:
                tmp.unlink(missing_ok=True)
                os.link(saved, tmp)
                os.replace(tmp, path)
                fsync_dir(path.parent)
                return
            except OSError:  # a file system without hard links: write it
                tmp.unlink(missing_ok=True)
        self._write_checkpoint(path, rnd, state, extras)

    def _checkpoint_due(self, rnd: int) -> bool:
        return rnd == self.rounds or (self.checkpoint_every > 0 and rnd % self.checkpoint_every == 0)

    def save_checkpoint(self, rnd: int, state: Mapping[str, torch.Tensor], extras: Mapping[str, Any] | None = None) -> Path:
        path = self._write_checkpoint(self.checkpoint_path(rnd), rnd, state, extras)
        if self.keep_checkpoints:
            self._prune_checkpoints(rnd)
        return path

    def _write_checkpoint(self, path: Path, rnd: int, state: Mapping[str, torch.Tensor],
                          extras: Mapping[str, Any] | None) -> Path:
        payload = {**(extras or {}), "model_state_dict": {k: v.contiguous() for k, v in state.items()},
                   "experiment_key": self.key, "round": rnd, "config": self.config, "history": list(self.history)}
        atomic_write(path, lambda f: torch.save(payload, f))
        return path

    def _prune_checkpoints(self, rnd: int) -> None:
        """Keep this run's `keep_checkpoints` latest checkpoints up to round `rnd`; delete its earlier ones."""
        prefix = self.checkpoint_path(0).name.removesuffix("0.pth")
        rounds = sorted(int(m.group(1)) for p in self.checkpoint_path(rnd).parent.iterdir()
                        if p.name.startswith(prefix) and (m := re.fullmatch(r"(\d+)\.pth", p.name[len(prefix):]))
                        and int(m.group(1)) <= rnd)
        for old in rounds[:-self.keep_checkpoints]:
            self.checkpoint_path(old).unlink(missing_ok=True)
        if rounds[:-self.keep_checkpoints]:
            fsync_dir(self.checkpoint_path(rnd).parent)

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rounds = [h[0] for h in self.history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.plot(rounds, [h[1] for h in self.history], marker="o")
        a.set(xlabel="round", ylabel="held-out loss")
        b.plot(rounds, [h[2] for h in self.history], marker="o")
        b.set(xlabel="round", ylabel="perplexity", yscale="log")
        fig.suptitle(f"{self.model_name}, world size {self.world_size}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write(self.eval_path.with_suffix(".png"), lambda f: f.write(buf.getvalue()))


def load_run_checkpoint(path: str | Path) -> dict:
    """A checkpoint this tool wrote, loaded safely (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a fedtp-flwr checkpoint ({e})") from e
    for k in ("model_state_dict", "experiment_key", "round", "config"):
        if not isinstance(ckpt, dict) or k not in ckpt:
            raise ValueError(f"{path}: not a fedtp-flwr checkpoint (missing {k!r})")
    return ckpt
