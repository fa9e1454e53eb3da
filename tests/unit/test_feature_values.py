"""Feature values read from the online store become the request's column values: plain kinds as the store holds
them, every other kind through Feast's own conversion."""

from __future__ import annotations

from datetime import UTC, datetime

from releasegate import feast_import
from releasegate.serving.features import _Asked, _Direct

feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py): later tests' metrics stay theirs
from feast.protos.feast.types.Value_pb2 import DoubleList, Value  # noqa: E402
from feast.type_map import feast_value_type_to_python_type  # noqa: E402


def test_each_kind_of_value_is_what_feasts_own_conversion_makes_of_it():
    held = {
        "tenure": Value(int64_val=7),
        "spend": Value(double_val=12.5),
        "plan": Value(string_val="gold"),
        "active": Value(bool_val=True),
        "seen": Value(unix_timestamp_val=1_700_000_000),
        "history": Value(double_list_val=DoubleList(val=[1.0, 2.5])),
        "unset": Value(),
    }
    names = list(held)
    # Two entities: rows 0 and 2 are the first's, row 1 the second's, which the store does not hold.
    asked = _Asked(table=None, names=names, keys=[], rows=([0, 2], [1]))  # type: ignore[arg-type]
    found = _Direct.values(3, [(asked, [(None, held), (None, None)])])
    for name in names:
        expected = feast_value_type_to_python_type(held[name])
        assert found[name] == [expected, None, expected], name
    assert found["seen"][0] == datetime.fromtimestamp(1_700_000_000, tz=UTC)
    assert found["history"][0] == [1.0, 2.5] and found["unset"] == [None, None, None]
    assert type(found["tenure"][0]) is int and type(found["active"][0]) is bool
