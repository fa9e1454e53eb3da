"""Model outputs and ground truth as comparable scalars, whatever JSON shape the gateway or a client used."""

from __future__ import annotations

import math
from typing import Any

import orjson

Scalar = float | str


def scalar(value: Any) -> Scalar | None:
    """A JSON text or value (scalar, one-element list, one-value dict) as a float or str; None if not one value."""
    if isinstance(value, (bytes, str)):
        try:
            value = orjson.loads(value)
        except ValueError:
            return _from_text(value.decode() if isinstance(value, bytes) else value)
    for _ in range(4):  # {"prediction": [1]} nests a little; deeper is not one prediction
        if isinstance(value, dict) and len(value) == 1:
            value = next(iter(value.values()))
        elif isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        else:
            break
    if value is None or isinstance(value, (dict, list, tuple)):
        return None
    if isinstance(value, str):
        return _from_text(value)
    try:
        number = float(value)  # bool, int, float, numpy scalars
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def per_row(value: Any) -> list[Scalar | None]:
    """Ground truth for the rows of one request: a list as long as its rows, else one label for row 0."""
    if isinstance(value, (bytes, str)):
        try:
            value = orjson.loads(value)
        except ValueError:
            return [scalar(value)]
    if isinstance(value, (list, tuple)) and len(value) > 1:
        return [scalar(v) for v in value]
    return [scalar(value)]


def _from_text(text: str) -> Scalar:
    # "1" from one client and 1 from another are the same label.
    try:
        number = float(text)
    except ValueError:
        return text.strip()
    return number if math.isfinite(number) else text.strip()
