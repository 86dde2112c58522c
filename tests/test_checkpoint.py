"""Checkpoint schema: atomic writes, strict loads, clear errors."""

from __future__ import annotations

import pytest
import torch

from charseg import checkpoint as ckpt
from charseg.errors import CheckpointError


def sample_checkpoint(epoch: int = 1, num_classes: int = 2) -> dict:
    return ckpt.make_checkpoint(epoch=epoch, model={"w": torch.ones(3)}, optimizer={}, scheduler={}, warmup={},
                                seed=1, rng={}, config={}, model_spec={}, num_classes=num_classes, metrics={},
                                best={})


def test_versioned_names():
    assert ckpt.epoch_filename(1) == "model_epoch_001.pth"
    assert ckpt.epoch_filename(12) == "model_epoch_012.pth"
    assert ckpt.epoch_filename(1234) == "model_epoch_1234.pth"


def test_round_trip(tmp_path):
    path = ckpt.save_checkpoint(sample_checkpoint(3), tmp_path / "a" / "x.pth")
    loaded = ckpt.load_checkpoint(path, num_classes=2)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(3))


def test_half_written_checkpoint_never_replaces_a_good_one(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(sample_checkpoint(1), tmp_path / "last.pth")
    good = path.read_bytes()

    def crash_mid_write(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(sample_checkpoint(2), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"x\.pth: not a charseg checkpoint"):
        ckpt.load_checkpoint(path)
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"holds a dict with keys \['conv.weight'\].*--weights PATH"):
        ckpt.load_checkpoint(path)


def test_unknown_format_version(tmp_path):
    state = sample_checkpoint()
    state["format_version"] = 99
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="format version 99"):
        ckpt.load_checkpoint(tmp_path / "x.pth")


def test_missing_and_unknown_keys(tmp_path):
    state = sample_checkpoint()
    del state["optimizer"]
    state["surprise"] = 1
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"missing \['optimizer'\], unknown \['surprise'\]"):
        ckpt.load_checkpoint(tmp_path / "x.pth")


def test_wrong_num_classes(tmp_path):
    path = ckpt.save_checkpoint(sample_checkpoint(num_classes=91), tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="91-class model, charseg expects 2"):
        ckpt.load_checkpoint(path, num_classes=2)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")


def test_find_latest(tmp_path):
    assert ckpt.find_latest(tmp_path) is None
    for epoch in (1, 3, 2):
        ckpt.save_checkpoint(sample_checkpoint(epoch), tmp_path / ckpt.epoch_filename(epoch))
    (tmp_path / "junk.pth").write_text("x")
    assert ckpt.find_latest(tmp_path).name == "model_epoch_003.pth"


def test_pick_checkpoint_prefers_best_only_when_asked_and_else_the_latest():
    names = ["last.pth", "model_epoch_002.pth", "model_epoch_010.pth", "best.pth"]
    assert ckpt.pick_checkpoint(names, prefer_best=True) == "best.pth"
    assert ckpt.pick_checkpoint(names) == "model_epoch_010.pth"
    assert ckpt.pick_checkpoint(names + ["model_final.pth"]) == "model_final.pth"
    assert ckpt.pick_checkpoint(["last.pth"]) == "last.pth"
    assert ckpt.pick_checkpoint(names, epoch=2) == "model_epoch_002.pth"
    assert ckpt.pick_checkpoint(names, epoch=3) is None


def test_foreign_keys_inside_config_or_model_spec_are_refused(tmp_path):
    for key in ("config", "model_spec"):
        state = sample_checkpoint()
        state[key] = {"surprise": 1}
        path = ckpt.save_checkpoint(state, tmp_path / f"{key}.pth")
        with pytest.raises(CheckpointError, match=rf"{key}\.pth: its {key} does not fit.*surprise"):
            ckpt.load_checkpoint(path)


def test_one_write_then_hard_links(tmp_path, monkeypatch):
    writes = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, fh, *a, **k: (writes.append(1), real_save(obj, fh, *a, **k)))
    paths = ckpt.save_checkpoint_as(sample_checkpoint(3), [tmp_path / "model_epoch_003.pth",
                                                           tmp_path / "model_final.pth"])
    assert len(writes) == 1
    assert paths[0].stat().st_ino == paths[1].stat().st_ino
    assert ckpt.load_checkpoint(paths[1])["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_epoch_003.pth", "model_final.pth"]


def test_copy_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError("hard links not supported")

    monkeypatch.setattr("os.link", no_links)
    first = ckpt.save_checkpoint(sample_checkpoint(1), tmp_path / "a.pth")
    copy = ckpt.link_or_copy(first, tmp_path / "b.pth")
    assert copy.read_bytes() == first.read_bytes() and copy.stat().st_ino != first.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth"]


def test_one_writer_per_output_folder_and_a_killed_holder_frees_it(tmp_path):
    """fcntl.flock: a second process is refused at once, naming the holder; SIGKILL of the
    holder releases the folder (no stale lock to clean up by hand), and the next holder
    removes the temporary files a killed writer left."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom charseg import checkpoint as c\n"
         f"with c.exclusive_output_dir({str(out)!r}, 'PID 4242 on box (MLflow run abc)'):\n"
         "    print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"{out} is being written by PID 4242 on box \\(MLflow run abc\\): "
                                                  "one training per output folder"):
            with ckpt.exclusive_output_dir(out, "me"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # What a writer killed mid-save leaves; the next holder of the folder removes it.
    (out / ".model_epoch_002.pth.x8k2.tmp").write_bytes(b"half a checkpoint")
    (out / ".best.pth.4242.link.tmp").write_bytes(b"")
    (out / "notes.tmp").write_text("not ours")
    # A resume by run ID killed mid-download, and this process's own download in use.
    (out / ".download-4242-k2j1.tmp" / "checkpoints").mkdir(parents=True)
    (out / ".download-4242-k2j1.tmp" / "checkpoints" / "last.pth").write_bytes(b"downloaded")
    (out / f"{ckpt.download_prefix()}mine.tmp").mkdir()
    with ckpt.exclusive_output_dir(out, "PID 7 on box"):
        assert (out / ckpt.LOCK_NAME).read_text() == "PID 7 on box"
        assert sorted(p.name for p in out.iterdir()) == [ckpt.LOCK_NAME, f"{ckpt.download_prefix()}mine.tmp",
                                                         "notes.tmp"]


def test_checkpoints_without_the_optional_run_id_still_load(tmp_path):
    state = sample_checkpoint(1)
    assert state["run_id"] == ""
    del state["run_id"]  # written before checkpoints named their run
    ckpt.save_checkpoint(state, tmp_path / "old.pth")
    assert "run_id" not in ckpt.load_checkpoint(tmp_path / "old.pth")


def test_final_written_reads_the_epoch_beside_the_checkpoint_or_in_the_output_folder(tmp_path):
    ckpt.save_checkpoint(sample_checkpoint(3), tmp_path / "run" / "model_epoch_003.pth")
    assert not ckpt.final_written(tmp_path / "run" / "model_epoch_003.pth", 3, tmp_path / "elsewhere")
    ckpt.save_checkpoint(sample_checkpoint(2), tmp_path / "run" / ckpt.FINAL_NAME)  # an older run's
    assert not ckpt.final_written(tmp_path / "run" / "model_epoch_003.pth", 3, tmp_path / "elsewhere")
    ckpt.save_checkpoint(sample_checkpoint(3), tmp_path / "elsewhere" / ckpt.FINAL_NAME)
    assert ckpt.final_written(tmp_path / "run" / "model_epoch_003.pth", 3, tmp_path / "elsewhere")
    assert ckpt.final_written(tmp_path / "dl" / ckpt.FINAL_NAME, 3, tmp_path / "new")
