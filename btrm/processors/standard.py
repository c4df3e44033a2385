"""Rows already in the standard format: validated, nothing else."""

from __future__ import annotations

from typing import Any

from btrm.processors.base import BaseBradleyTerryTrainDataset, first_given, require


class StandardDataset(BaseBradleyTerryTrainDataset):
    """``{"chosen": [messages], "rejected": [messages]}`` with optional ``tools``, ``margin``, ``id``,
    ``source`` (or ``subset``)."""

    name = "standard"
    required_fields = ("chosen", "rejected")
    read_fields = ("chosen", "rejected", "tools", "margin", "id", "source", "subset")

    def convert(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "chosen": require(row, "chosen"),  # (here, not in the pair's check: its error names the row's fields)
            "rejected": require(row, "rejected"),
            "tools": row.get("tools"),
            "margin": row.get("margin"),
            "id": row.get("id"),
            "source": first_given(row, "source", "subset"),
        }
