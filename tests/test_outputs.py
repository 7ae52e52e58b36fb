"""Output files: atomic writes, safe reading of results and checkpoints."""

import os
import pickle

import pytest
import torch

from fedtp_flwr.server.outputs import RunOutputs, atomic_write, load_run_checkpoint, read_results


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_results_file_with_code_in_it_is_refused(tmp_path):
    path = tmp_path / "experiment_results_llama32.pkl"
    path.write_bytes(pickle.dumps({"k": Evil()}))
    with pytest.raises(ValueError, match="refusing to load"):
        read_results(path)


def test_results_file_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "r.pkl"
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict"):
        read_results(path)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def crash(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"model_state_dict": {}, "experiment_key": Evil(), "round": 1, "config": {}}, path)
    with pytest.raises(ValueError, match="cannot be read"):
        load_run_checkpoint(path)


def test_checkpoint_round_trip_and_missing_fields(tmp_path):
    out = RunOutputs(tmp_path, (2, 0.1, False, 3, 1), 2, 3, 0.1, "llama3.2-3b", {"world-size": 2})
    state = {"w": torch.randn(3, 3)}
    out.record(0, 2.0, 7.4, None)
    out.record(1, 1.5, 4.5, state)
    path = out.checkpoint_path(1)
    assert path.name == "llama32_3b_ws2_lr0.1_round1.pth"
    ckpt = load_run_checkpoint(path)
    assert torch.equal(ckpt["model_state_dict"]["w"], state["w"]) and ckpt["history"] == [(0, 2.0, 7.4), (1, 1.5, 4.5)]
    torch.save({"round": 1}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing 'model_state_dict'"):
        load_run_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        load_run_checkpoint(tmp_path / "nope.pth")


def _outputs(tmp_path, keep=0):
    return RunOutputs(tmp_path, (2, 1e-3, False, 4, 42), 2, 4, 1e-3, "llama3.2-tiny", {"k": 1}, 1, keep)


def test_stale_temp_files_of_this_tool_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    ours = [tmp_path / ".experiment_results_llama32.pkl.k2j3h4.tmp",
            tmp_path / ".eval_res_llama32_ws2_r4.txt.abc_12.tmp",
            tmp_path / "checkpoints" / ".llama32_tiny_ws2_lr0.001_round3.pth.x8y9z.tmp"]
    theirs = [tmp_path / ".notes.txt.abc.tmp", tmp_path / "experiment_results_llama32.pkl",
              tmp_path / "checkpoints" / "llama32_tiny_ws2_lr0.001_round3.pth"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    assert sorted(_outputs(tmp_path).remove_stale_temp_files()) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


def test_keep_checkpoints_keeps_the_latest_rounds_of_this_run_only(tmp_path):
    other = tmp_path / "checkpoints" / "llama32_tiny_ws4_lr0.001_round1.pth"  # another run's
    other.parent.mkdir()
    other.write_bytes(b"x")
    out = _outputs(tmp_path, keep=2)
    for rnd in range(1, 5):
        out.save_checkpoint(rnd, {"w": torch.zeros(2)})
    assert sorted(p.name for p in other.parent.iterdir()) == [
        "llama32_tiny_ws2_lr0.001_round3.pth", "llama32_tiny_ws2_lr0.001_round4.pth", other.name]
    everything = _outputs(tmp_path / "all")
    for rnd in range(1, 4):
        everything.save_checkpoint(rnd, {"w": torch.zeros(2)})
    assert len(list((tmp_path / "all" / "checkpoints").iterdir())) == 3


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    import fedtp_flwr.server.outputs as outputs_module

    synced = []
    real = outputs_module.fsync_dir
    monkeypatch.setattr(outputs_module, "fsync_dir", lambda p: (synced.append((p, (p / "f").exists())), real(p)))
    atomic_write(tmp_path / "f", lambda f: f.write(b"data"))
    assert synced == [(tmp_path, True)]  # after the rename: the file is there when its folder is synced


def test_the_best_checkpoint_follows_the_lowest_held_out_loss(tmp_path):
    out = RunOutputs(tmp_path, (2, 0.1, False, 4, 1), 2, 4, 0.1, "llama3.2-tiny", {}, checkpoint_every=2)
    losses = {0: 1.0, 1: 3.0, 2: 2.0, 3: 2.5, 4: float("nan")}  # round 0 (untrained) never counts
    for rnd, loss in losses.items():
        out.record(rnd, loss, 1.0, {"w": torch.full((2,), float(rnd))})
        if rnd >= 1:
            best = load_run_checkpoint(out.best_checkpoint_path)
            assert best["round"] == {1: 1, 2: 2, 3: 2, 4: 2}[rnd]
            assert best["model_state_dict"]["w"].tolist() == [float(best["round"])] * 2
    assert out.best_checkpoint_path.name == "llama32_tiny_ws2_lr0.1_best.pth"
    # round 2's checkpoint was due: the best is the same file, not a second copy
    assert os.path.samefile(out.best_checkpoint_path, out.checkpoint_path(2))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
