"""Output files: atomic writes, safe reading of results and checkpoints."""

import os
import pickle

import pytest
import torch

from fedtp_flwr.outputs import RunOutputs, atomic_write, load_run_checkpoint, read_results


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
