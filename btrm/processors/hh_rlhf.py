"""Anthropic hh-rlhf: ``chosen``/``rejected`` transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``."""

from __future__ import annotations

import re
from typing import Any

from btrm.processors.base import BaseBradleyTerryTrainDataset, RowError, first_given, require

_TURN = re.compile(r"\n\n(Human|Assistant):")  # (then a space, as a rule; a line break in some copies)
_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(text, str):
        raise RowError(field, f"must be a transcript string, got {type(text).__name__}")
    parts = _TURN.split(text)
    if parts[0].strip():
        raise RowError(field, "must start with '\\n\\nHuman: '")
    # parts = ['', 'Human', text, 'Assistant', text, ...]
    return [{"role": _ROLE[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


class HHRLHFDataset(BaseBradleyTerryTrainDataset):
    name = "hh_rlhf"
    required_fields = ("chosen", "rejected")
    read_fields = ("chosen", "rejected", "id", "source", "subset")

    def convert(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "chosen": parse_transcript(require(row, "chosen"), "chosen"),
            "rejected": parse_transcript(require(row, "rejected"), "rejected"),
            "id": row.get("id"),
            "source": first_given(row, "source", "subset"),
        }
