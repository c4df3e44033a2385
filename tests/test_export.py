"""Publishing an export is atomic: an interrupted copy never leaves a directory that looks finished,
and a finished one replaces the previous export only once it is complete."""

from __future__ import annotations

import json
import shutil

import pytest

from btrm.export import check_replaceable, json_safe, publish_dir


def _export(directory, marker: str):
    directory.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "btrm.json"):
        (directory / name).write_text(marker)
    return directory


def test_interrupted_publish_leaves_no_finished_looking_directory(tmp_path, monkeypatch):
    source = _export(tmp_path / "staged", "new")
    destination = tmp_path / "out" / "model"
    real_copy = shutil.copyfile
    copied = []

    def copy_then_die(src, dst, **kwargs):
        if len(copied) == 1:
            raise KeyboardInterrupt  # the job is stopped halfway through the copy
        copied.append(src)
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(source, destination)
    assert not destination.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no half-written staging directory either

    monkeypatch.setattr(shutil, "copyfile", real_copy)
    assert publish_dir(source, destination) == destination.resolve()
    assert (destination / "btrm.json").read_text() == "new"


def test_publish_replaces_an_earlier_export_only_when_complete(tmp_path, monkeypatch):
    destination = _export(tmp_path / "out" / "model", "old")
    source = _export(tmp_path / "staged", "new")
    monkeypatch.setattr(shutil, "copyfile", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        publish_dir(source, destination)
    assert (destination / "btrm.json").read_text() == "old"  # the earlier export is untouched
    monkeypatch.undo()
    publish_dir(source, destination)
    assert (destination / "btrm.json").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]


def test_publish_swaps_an_earlier_export_for_the_new_one_in_one_step(tmp_path, monkeypatch):
    """Where the system can (Linux), the new export and the earlier one trade places in one rename: the
    directory is never missing, not even for a moment, for a service that loads it meanwhile."""
    import btrm.export as export

    if not export.exchange(_export(tmp_path / "a", "a"), _export(tmp_path / "b", "b")):
        pytest.skip("this system or filesystem swaps no directories (renameat2 RENAME_EXCHANGE: Linux)")
    destination = _export(tmp_path / "out" / "model", "old")
    source = _export(tmp_path / "staged", "new")
    renames = []
    monkeypatch.setattr(export.os, "rename", lambda *paths: renames.append(paths))
    publish_dir(source, destination)
    assert (destination / "btrm.json").read_text() == "new" and renames == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]
    monkeypatch.undo()  # where it cannot: the earlier export renamed away, then the new one in
    monkeypatch.setattr(export, "exchange", lambda a, b: False)
    publish_dir(_export(tmp_path / "newer", "newer"), destination)
    assert (destination / "btrm.json").read_text() == "newer"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]
    # A rename refused midway (the new export's, say) puts the earlier export back and leaves no copy behind.
    rename = export.os.rename

    def refusing_the_new_one(source, target):
        if ".staging-" in str(source):
            raise OSError(16, "Device or resource busy")
        rename(source, target)

    monkeypatch.setattr(export.os, "rename", refusing_the_new_one)
    with pytest.raises(OSError, match="busy"):
        publish_dir(_export(tmp_path / "newest", "newest"), destination)
    assert (destination / "btrm.json").read_text() == "newer"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]


def test_manifest_and_log_values_are_strict_json():
    """A diverged run's NaN loss, or a step without a gradient norm, is written as null, not as NaN (which
    strict JSON readers, and the service's /info, refuse)."""
    line = {"step": 3, "train/loss": float("nan"), "train/grad_norm": float("inf"), "eval": {"std": [1.0, -float("inf")]}}
    assert json_safe(line) == {"step": 3, "train/loss": None, "train/grad_norm": None, "eval": {"std": [1.0, None]}}
    assert json.loads(json.dumps(json_safe(line), allow_nan=False)) == json_safe(line)



def test_publish_from_remote_storage_reads_only_the_export(tmp_path):
    """A checkpoint in cloud storage also holds DeepSpeed's optimizer state (~12 bytes per parameter):
    publishing the export reads the export's files and nothing else of the checkpoint."""
    import fsspec
    import pyarrow.fs as pafs

    checkpoint = tmp_path / "bucket" / "checkpoint_000003"
    _export(checkpoint / "model", "new")
    (checkpoint / "model" / "tokenizer").mkdir()
    (checkpoint / "model" / "tokenizer" / "tokenizer.json").write_text("{}")
    _export(checkpoint / "deepspeed" / "global_step3", "optimizer state")
    opened = []

    class Recording(pafs.FSSpecHandler):  # a filesystem that is not pyarrow's LocalFileSystem, like S3's
        def open_input_stream(self, path):
            opened.append(path)
            return super().open_input_stream(path)

        def open_input_file(self, path):
            opened.append(path)
            return super().open_input_file(path)

    remote = pafs.PyFileSystem(Recording(fsspec.filesystem("file")))
    destination = publish_dir(f"{checkpoint}/model", tmp_path / "out" / "model", filesystem=remote)
    assert sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file()) == [
        "btrm.json", "config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert (destination / "btrm.json").read_text() == "new"
    assert opened and all("/model/" in path for path in opened)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]


def test_publish_from_s3_copies_an_export_of_files_only(tmp_path, s3_server):
    """What a run with --storage_path s3://... publishes: an export with no sub-folder (S3 has no folders, so no
    listing entry makes the copy's own)."""
    s3 = s3_server.filesystem
    s3.create_dir("runs")
    for name in ("config.json", "model.safetensors", "btrm.json"):
        with s3.open_output_stream(f"runs/tiny/checkpoint_000001/model/{name}") as f:
            f.write(name.encode())
    with s3.open_output_stream("runs/tiny/checkpoint_000001/deepspeed/optimizer_states.pt") as f:
        f.write(b"optimizer state")
    destination = publish_dir("runs/tiny/checkpoint_000001/model", tmp_path / "out" / "model", filesystem=s3)
    assert sorted(p.name for p in destination.iterdir()) == ["btrm.json", "config.json", "model.safetensors"]
    assert (destination / "btrm.json").read_text() == "btrm.json"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]


def test_publish_replaces_only_an_earlier_export_or_nothing(tmp_path):
    """--output_path ~/models (meant as "put it in there") must not wipe the models already there."""
    source = _export(tmp_path / "staged", "new")
    folder = tmp_path / "models"
    (folder / "other_model").mkdir(parents=True)
    (folder / "other_model" / "weights").write_text("keep")
    with pytest.raises(SystemExit, match="holds files but no btrm.json"):
        publish_dir(source, folder)
    assert (folder / "other_model" / "weights").read_text() == "keep"
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(SystemExit, match="is not a directory"):
        check_replaceable(tmp_path / "a_file")
    (tmp_path / "empty").mkdir()
    for destination in (tmp_path / "empty", tmp_path / "new", folder / "rm"):
        assert (publish_dir(source, destination) / "btrm.json").read_text() == "new"


def test_a_model_directory_missing_where_it_is_read_names_the_node(tmp_path):
    """On a cluster each worker, scoring actor and replica reads the model on its own node: an absolute path
    missing there is said so (transformers took it for a malformed hub name); a hub name is left to transformers."""
    import socket

    from btrm.export import model_on_this_node, read_manifest
    from btrm.model import load_reward_model
    from btrm.tokenize import load_tokenizer

    for load in (load_tokenizer, lambda path: load_reward_model(path, 0), read_manifest):
        with pytest.raises(FileNotFoundError, match=f"{tmp_path}/absent: no such directory on {socket.gethostname()}; "
                                                    "on a cluster, a model must be where every node reads it"):
            load(str(tmp_path / "absent"))
    assert model_on_this_node("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B" and model_on_this_node(tmp_path) == str(tmp_path)
