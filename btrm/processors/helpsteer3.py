"""HelpSteer3 preference data, in both layouts users meet.

* RM-Gallery's DataSample: ``{"input": [messages], "output": [{"answer": {role, content, "label":
  {"is_preferred": bool}}}, ...]}`` (its DataOutput's answer is a Step, which carries the label); the label
  beside the answer, ``{"answer": {...}, "label": {...}}``, is taken too, and ``input``/``output`` may be JSON
  strings (as RM-Gallery's own HelpSteer3 loader allows). Each preferred answer against each non-preferred one.
* NVIDIA's native rows: ``context`` (messages), ``response1``, ``response2`` and
  ``overall_preference`` in -3..3, negative meaning response1 is better; ``|overall_preference|``
  becomes the pair's margin.

Ties and missing labels are never turned into a preference: they are dropped and counted.
"""

from __future__ import annotations

from typing import Any

from btrm.processors.base import (BaseBradleyTerryTrainDataset, RowDropped, RowError, absent, as_list, as_message,
                                  as_messages, check_prompt_end, first_given, require)


class HelpSteer3Dataset(BaseBradleyTerryTrainDataset):
    name = "helpsteer3"
    read_fields = ("input", "output", "id", "unique_id", "source",  # RM-Gallery's layout
                   "context", "response1", "response2", "overall_preference", "domain")  # NVIDIA's

    def convert(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        # (a file may hold both layouts' columns, null or NaN where a row has none: a row is of the layout it has values of)
        if not absent(row.get("output")) or not absent(row.get("input")):
            return self._from_rm_gallery(row)
        if "context" in row:
            return [self._from_native(row)]
        raise RowError("input", "neither HelpSteer3 layout: expected `input` + `output` (RM-Gallery) or "
                       "`context` + `response1` + `response2` + `overall_preference` (NVIDIA)")

    def _from_rm_gallery(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = as_messages(require(row, "input"), "input")
        check_prompt_end(prompt, "input")
        outputs = as_list(require(row, "output"), "output", "answers")
        if len(outputs) < 2:
            raise RowError("output", "must be a list of at least two answers")
        preferred, other = [], []
        for i, output in enumerate(outputs):
            if not isinstance(output, dict):
                raise RowError(f"output[{i}]", "must be {'answer': {role, content, 'label': {'is_preferred': bool}}}")
            answer = output.get("answer")
            if answer is None:
                raise RowError(f"output[{i}].answer", f"missing (output[{i}] has {sorted(output)})")
            # RM-Gallery's Step holds its label ({} where none was set); a hand-written row may put it beside the answer.
            labels = (answer.get("label") if isinstance(answer, dict) else None, output.get("label"))
            is_preferred = next((label["is_preferred"] for label in labels
                                 if isinstance(label, dict) and label.get("is_preferred") is not None), None)
            if is_preferred is None:
                raise RowDropped("missing_label", f"output[{i}].answer.label.is_preferred is missing")
            if is_preferred not in (True, False):  # (0 and 1 too) the string "false" must not read as preferred
                raise RowError(f"output[{i}].answer.label.is_preferred", f"must be true or false, got {is_preferred!r}")
            try:  # a malformed answer costs the pairs it is in, not the row's others
                answer = as_message(answer, f"output[{i}].answer")
            except RowError as e:
                answer = e
            (preferred if is_preferred else other).append(answer)
        if not preferred or not other:
            raise RowDropped("tie", f"{len(preferred)} preferred and {len(other)} non-preferred answers")
        row_id = first_given(row, "id", "unique_id")
        answer_pairs = [(better, worse) for better in preferred for worse in other]
        return [
            better if isinstance(better, RowError) else worse if isinstance(worse, RowError) else {
                "chosen": prompt + [better],
                "rejected": prompt + [worse],
                "id": None if row_id is None else (str(row_id) if len(answer_pairs) == 1 else f"{row_id}/{k}"),
                "source": first_given(row, "source", "domain"),
            }
            for k, (better, worse) in enumerate(answer_pairs)
        ]

    def _from_native(self, row: dict[str, Any]) -> dict[str, Any]:
        context = as_messages(require(row, "context"), "context")
        check_prompt_end(context, "context")
        # Checked under their own names: which one becomes chosen depends on the preference.
        responses = [as_message({"role": "assistant", "content": require(row, field)}, field)
                     for field in ("response1", "response2")]
        preference = row.get("overall_preference")
        if absent(preference):
            raise RowDropped("missing_label", "overall_preference is missing")
        try:
            integer = int(preference)
        except (TypeError, ValueError, OverflowError):
            integer = None
        if integer is None or isinstance(preference, bool) or integer != preference:  # -0.5 is no tie, 1.7 no 1
            raise RowError("overall_preference", f"must be an integer in -3..3, got {preference!r}")
        preference = integer
        if not -3 <= preference <= 3:
            raise RowError("overall_preference", f"must be in -3..3, got {preference}")
        if preference == 0:
            raise RowDropped("tie", "overall_preference is 0")
        better, worse = responses if preference < 0 else responses[::-1]
        return {
            "chosen": context + [better],
            "rejected": context + [worse],
            "margin": abs(preference),
            "id": row.get("id"),
            "source": first_given(row, "domain", "source"),
        }
