"""Personal data in the log: each column in the form its class allows, keys that rotate, reports that compare
like with like."""

from __future__ import annotations

import pandas as pd
import pytest

from releasegate import privacy
from releasegate.contract import CLASSIFICATION_TAG
from releasegate.privacy import Classification, DataClass, Protector
from releasegate.serving.payloads import Rows
from releasegate.settings import Settings

EMIRATES_ID = "784-1985-1234567-1"
EMAIL = "fatima@example.ae"


def _rows() -> Rows:
    return Rows(
        {
            "age": [41, 29],
            "region": ["north", "north"],
            "emirates_id": [EMIRATES_ID, None],
            "email": [EMAIL, "omar@example.ae"],
            "notes": ["call back", "vip"],
        },
        2,
    )


CLASSES = Classification(
    columns={"emirates_id": DataClass.pseudonymise, "email": DataClass.encrypt, "notes": DataClass.drop}
)


def test_each_column_is_logged_in_the_form_its_class_allows(tmp_path):
    protector = Protector.of(Settings(home=tmp_path))
    rows = _rows()
    logged = protector.rows(rows, CLASSES)
    assert logged.columns["age"] == [41, 29]  # a number, unclassified: public by default
    region = logged.columns["region"]  # text, unclassified: pseudonymised by default, and still one category
    assert region[0] == region[1] and region[0].startswith("p:") and len(region[0]) == 34
    assert logged.columns["emirates_id"][0].startswith("p:") and logged.columns["emirates_id"][1] is None
    assert all(v.startswith("e:k1:") for v in logged.columns["email"])
    assert "notes" not in logged.columns
    assert EMIRATES_ID not in repr(logged.columns) and EMAIL not in repr(logged.columns)
    assert rows.columns["emirates_id"][0] == EMIRATES_ID  # what the model gets is untouched
    assert [protector.decrypt(v) for v in logged.columns["email"]] == rows.columns["email"]


def test_a_pseudonym_is_stable_per_deployment_and_useless_without_its_pepper(tmp_path):
    ours = Protector.of(Settings(home=tmp_path))
    assert ours.pseudonym(EMIRATES_ID) == Protector.of(Settings(home=tmp_path)).pseudonym(EMIRATES_ID)
    theirs = Protector.of(Settings(home=tmp_path / "other"))
    assert ours.pseudonym(EMIRATES_ID) != theirs.pseudonym(EMIRATES_ID)
    assert ours.pseudonym("1") != ours.pseudonym(1)  # typed: a string and a number are different values


def test_a_new_data_key_seals_new_rows_and_old_rows_keep_theirs(tmp_path):
    old = Protector.of(Settings(home=tmp_path)).encrypt(EMAIL)
    rotated = Protector.of(Settings(home=tmp_path, data_key_id="k2"))
    new = rotated.encrypt(EMAIL)
    assert old.startswith("e:k1:") and new.startswith("e:k2:")
    assert rotated.decrypt(old) == rotated.decrypt(new) == EMAIL
    with pytest.raises(KeyError):  # a deployment without the key reads nothing
        Protector.of(Settings(home=tmp_path / "elsewhere")).decrypt(new)


def test_a_malformed_classification_tag_names_the_problem():
    assert Classification.from_tags("churn", {}) == Classification()
    tags = {CLASSIFICATION_TAG: '{"columns": {"email": "hide"}}'}
    with pytest.raises(privacy.ClassificationError, match=r"churn's releasegate.classification tag .*columns.email"):
        Classification.from_tags("churn", tags)
    assert Classification.from_tags("churn", {CLASSIFICATION_TAG: '{"strings": "public"}'}).strings is DataClass.public


def test_reference_data_is_compared_in_the_form_the_traffic_was_logged(tmp_path):
    protector = Protector.of(Settings(home=tmp_path))
    logged = protector.rows(_rows(), CLASSES)
    current = pd.DataFrame(logged.columns)
    reference = pd.DataFrame({k: v for k, v in _rows().columns.items() if k != "notes"})
    ref, cur = privacy.align(reference, current, protector)
    assert "email" not in ref.columns and "email" not in cur.columns  # encrypted: in no report
    assert ref["region"].tolist() == cur["region"].tolist()  # the same tokens for the same values
    assert ref["age"].tolist() == [41, 29]
    raw, same = privacy.align(reference, reference, protector)  # traffic logged raw (another writer): as it was
    assert raw is reference and same is reference


def test_an_encrypted_column_is_opened_in_reports_only_where_the_classification_allows(tmp_path):
    protector = Protector.of(Settings(home=tmp_path))
    current = pd.DataFrame(protector.rows(_rows(), CLASSES).columns)
    reference = pd.DataFrame({k: v for k, v in _rows().columns.items() if k != "notes"})
    allowed = Classification.model_validate_json('{"decrypt_in_reports": ["email"]}').decrypt_in_reports
    ref, cur = privacy.align(reference, current, protector, decrypt=allowed)
    assert cur["email"].tolist() == ref["email"].tolist() == [EMAIL, "omar@example.ae"]  # opened, like for like
    assert all(v.startswith("e:") for v in current["email"])  # the logged frame itself is untouched


def test_feedback_is_logged_in_the_form_its_model_declares(tmp_path):
    protector = Protector.of(Settings(home=tmp_path))
    declared = Classification.from_tags(
        "loans", {CLASSIFICATION_TAG: '{"feedback": {"ground_truth": "encrypt", "business_value": "drop"}}'}
    )
    truth, value = protector.feedback("defaulted", 1250.0, declared.feedback)
    assert truth.startswith('"e:k1:') and "defaulted" not in truth and value is None
    assert privacy.open_truths([truth, '"paid"'], protector) == ['"defaulted"', '"paid"']  # what a verdict reads
    assert protector.feedback("paid", 80.0, Classification().feedback) == ('"paid"', 80.0)  # the default: public
    with pytest.raises(privacy.ClassificationError, match="encrypted with data key 'k1'"):
        privacy.open_truths([truth], Protector.of(Settings(home=tmp_path / "elsewhere")))
    for field, value_ in (("ground_truth", "pseudonymise"), ("ground_truth", "drop"), ("business_value", "encrypt")):
        tag = {CLASSIFICATION_TAG: f'{{"feedback": {{"{field}": "{value_}"}}}}'}
        with pytest.raises(privacy.ClassificationError, match=f"feedback.{field}: .*not {value_}"):
            Classification.from_tags("loans", tag)


def test_a_feedback_item_gets_its_requests_model_classes_and_the_strictest_when_unknown():
    loans = Classification(feedback=privacy.FeedbackClasses(ground_truth=DataClass.encrypt))
    sales = Classification(feedback=privacy.FeedbackClasses(business_value=DataClass.drop))
    guard = privacy.FeedbackGuard(capacity=2)
    guard.declare("churn", Classification())
    assert guard.classes("r-unknown") == privacy.PUBLIC_FEEDBACK  # no served model protects its feedback
    guard.declare("loans", loans)
    guard.declare("sales", sales)
    guard.served("r1", loans)
    guard.served("r2", Classification())  # public feedback: not remembered, nothing to protect
    guard.served("r3", sales)
    assert guard.classes("r3") == sales.feedback
    assert guard.classes("r1") == loans.feedback
    guard.served("r4", loans)  # beyond capacity: the oldest is forgotten ...
    forgotten = guard.classes("r1")  # ... and gets the strictest of every declared model's classes
    assert forgotten.ground_truth is DataClass.encrypt and forgotten.business_value is DataClass.drop


def test_a_data_contract_checks_logged_traffic_in_the_form_it_was_logged(settings):
    """The nightly contract on logged inputs: a pseudonymised column's value set is checked on its tokens (so a
    planted unknown category still fails it), checks its tokens cannot answer are named as skipped."""
    from releasegate import validation

    protector = Protector.of(settings)
    regions = ["north", "south", "east", "west"]
    logged = pd.DataFrame({"region": [protector.pseudonym(r) for r in regions + ["mars"]], "age": [30] * 5})
    expectations = [
        {"type": "expect_column_to_exist", "kwargs": {"column": "region"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "region", "value_set": regions}},
        {"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "region", "max_value": 9}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "age", "min_value": 18}},
    ]
    classes = privacy.logged_classes(logged)
    assert classes == {"region": DataClass.pseudonymise}
    kept, skipped = validation._in_logged_form(expectations, classes, settings)
    assert [e["type"] for e in kept] == [expectations[i]["type"] for i in (0, 1, 3)]
    in_set = set(kept[1]["kwargs"]["value_set"])
    assert set(logged["region"][:4]) <= in_set and logged["region"][4] not in in_set
    assert skipped == ["region: expect_column_value_lengths_to_be_between (its values are logged pseudonymised)"]


def test_rows_of_a_model_with_every_column_public_are_logged_as_sent_and_one_protected_column_changes_that():
    protector = Protector(b"p" * 32, {"k1": b"k" * 32}, "k1")
    rows = Rows({"region": ["eu"], "age": [41]}, 1)
    public = Classification.model_validate({"strings": "public"})
    assert public.all_public and protector.rows(rows, public) is rows
    for declared in ({"columns": {"age": "drop"}}, {"strings": "public", "others": "encrypt"}, {}):
        classification = Classification.model_validate(declared)
        assert not classification.all_public
        assert protector.rows(rows, classification).columns != rows.columns, declared
