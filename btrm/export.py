"""The trained model as a plain Hugging Face directory, plus btrm's manifest.

    model.safetensors, config.json      AutoModelForSequenceClassification, one label, pad_token_id set
    tokenizer files + chat template     the tokenizer exactly as training used it
    btrm.json                           the manifest: tokenization, eval reward statistics, data ledger, versions

Directories appear only when complete: everything is written to a sibling staging directory that is
renamed into place at the end, so an interrupted export never leaves a directory that looks finished.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "btrm.json"


def versions() -> dict[str, str]:
    import deepspeed
    import ray
    import torch
    import transformers

    import btrm

    return {"btrm": btrm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "ray": ray.__version__}


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None: strict JSON readers (and the service's /info) refuse them,
    and a diverged run or a step without a gradient norm produces them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_model_dir(directory: str | Path, model, state_dict, tokenizer, manifest: dict[str, Any]) -> None:
    """Writes model, tokenizer and manifest into ``directory`` (a staging directory)."""
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    manifest = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(), **manifest}
    (directory / MANIFEST).write_text(json.dumps(json_safe(manifest), indent=2, default=str, allow_nan=False))


class ExportNotReplaceable(SystemExit):
    """A destination that publishing may not replace (a job stops with it, saying why)."""


def check_replaceable(destination: str | Path) -> None:
    """Refuses a destination that is something other than nothing, an empty directory or an earlier export:
    publishing replaces it whole."""
    destination = Path(destination)
    if not destination.exists() and not destination.is_symlink():
        return
    if not destination.is_dir():
        raise ExportNotReplaceable(f"{destination} exists and is not a directory: give a new directory for the model")
    if any(destination.iterdir()) and not (destination / MANIFEST).is_file():
        raise ExportNotReplaceable(f"{destination} holds files but no {MANIFEST}: it is not a model exported by btrm, "
                                   "and exporting replaces the whole directory. Give a new directory (or an earlier "
                                   "export's)")


def publish_dir(source: str | Path, destination: str | Path, filesystem: pafs.FileSystem | None = None) -> Path:
    """Copies a finished directory to ``destination`` atomically (stage next to it, then swap or rename).

    ``source`` may live on another ``filesystem`` (a checkpoint in cloud storage): only that directory is
    read, not the whole checkpoint around it, which also holds DeepSpeed's optimizer state (~12 bytes per
    parameter). An existing destination (an earlier export: check_replaceable) is replaced only once the new
    copy is complete.
    """
    check_replaceable(destination)
    destination = Path(destination).resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
            shutil.copytree(source, staging)
        else:
            # Made here: copy_files makes only the folders the listing names, and S3 names none for an export
            # of files alone (each file then failed: no such directory).
            staging.mkdir()
            pafs.copy_files(str(source), str(staging), source_filesystem=filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted copy leaves nothing behind
        raise
    if destination.exists() and exchange(staging, destination):  # staging now holds the earlier export
        shutil.rmtree(staging, ignore_errors=True)
        return destination
    # Else renames, with a moment without the directory where there is an earlier export. A rename that fails (a
    # mount point: EBUSY) leaves things as they were: the earlier export in place, no staging copy behind.
    retired = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        if destination.exists():
            os.rename(destination, retired)
        try:
            os.rename(staging, destination)
        except OSError:
            if retired.exists():
                os.rename(retired, destination)
            raise
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return destination


def exchange(a: Path, b: Path) -> bool:
    """Swaps two directories in one step (Linux's renameat2 RENAME_EXCHANGE), so that a reader of ``b`` (a
    service loading the model) finds the earlier export or the new one, never nothing, and a job killed
    meanwhile leaves one of them in place. False where the system or filesystem cannot (nothing changed)."""
    renameat2 = getattr(ctypes.CDLL(None), "renameat2", None)  # glibc 2.28+
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    # A failed call changes nothing (an old kernel or a filesystem without it, a sandbox refusing it): the
    # caller renames instead, and that reports its own errors.
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def model_on_this_node(path: str | Path) -> str:
    """``path``, a model directory found on this node, or a hub name (a relative path that is no directory
    here). An absolute path missing here is said so, naming the node: on a cluster, a worker, scoring actor or
    replica reads it on its own (transformers would take it for a malformed hub name)."""
    if os.path.isabs(path) and not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such directory on {socket.gethostname()}; on a cluster, a model "
                                "must be where every node reads it (shared storage)")
    return str(path)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_on_this_node(os.path.abspath(model_dir))) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {MANIFEST}; is this a model exported by btrm?")
    return json.loads(path.read_text())
