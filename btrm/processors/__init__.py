"""Processors: one source's rows → standard-format pairs. Built-ins and a user's own class from a file."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

from btrm.processors.base import BaseBradleyTerryTrainDataset, RowDropped, RowError, validate_pair
from btrm.processors.helpsteer3 import HelpSteer3Dataset
from btrm.processors.hh_rlhf import HHRLHFDataset
from btrm.processors.standard import StandardDataset

BUILTIN = {cls.name: cls for cls in (StandardDataset, HelpSteer3Dataset, HHRLHFDataset)}

__all__ = [
    "BUILTIN",
    "BaseBradleyTerryTrainDataset",
    "RowDropped",
    "ProcessorError",
    "RowError",
    "load_processor",
    "validate_pair",
]


class ProcessorError(ValueError):
    """The processor a job names cannot be had: an unknown name, a file missing or failing to import, no such class."""


def load_processor(name: str = "standard", custom_path: str | None = None) -> BaseBradleyTerryTrainDataset:
    """A built-in processor by name, or class ``name`` from the Python file ``custom_path``."""
    if custom_path is None:
        if name not in BUILTIN:
            raise ProcessorError(f"unknown dataset processor {name!r}; built in: {sorted(BUILTIN)} "
                             "(or pass --custom_bt_dataset_path FILE.py --custom_bt_dataset_name CLASS)")
        return BUILTIN[name]()
    return _load_custom(Path(custom_path), name)


def _load_custom(path: Path, class_name: str) -> BaseBradleyTerryTrainDataset:
    if not path.is_file():
        raise ProcessorError(f"--custom_bt_dataset_path {path}: no such file")
    module_name = f"btrm_custom_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # lets dataclasses and pickling resolve the module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ProcessorError(f"--custom_bt_dataset_path {path}: importing it failed: {type(e).__name__}: {e}") from e
    defined = sorted(n for n, obj in vars(module).items() if inspect.isclass(obj) and obj.__module__ == module_name)
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise ProcessorError(f"--custom_bt_dataset_name {class_name!r}: {path} defines no such class; "
                         f"it defines {defined or 'no classes'}")
    if not issubclass(cls, BaseBradleyTerryTrainDataset):
        subclasses = [n for n in defined if issubclass(getattr(module, n), BaseBradleyTerryTrainDataset)]
        raise ProcessorError(f"--custom_bt_dataset_name {class_name!r} in {path} must subclass "
                        f"btrm.processors.BaseBradleyTerryTrainDataset; subclasses defined there: {subclasses or 'none'}")
    try:
        return cls()
    except Exception as e:
        raise ProcessorError(f"--custom_bt_dataset_name {class_name!r} in {path}: creating it (`{class_name}()`) "
                             f"failed: {type(e).__name__}: {e}") from e
