"""Residency: a release that would put a model's data outside the regions it allows is refused before it opens."""

from __future__ import annotations

import pytest

from releasegate import audit, pipeline, registry, release, residency
from releasegate.backends import BackendKind
from releasegate.contract import REGIONS_TAG, AuditAction
from releasegate.settings import Settings
from tests.unit.mlflow_store import MODEL, register


def test_a_model_without_regions_may_go_anywhere(tmp_path):
    used = residency.check(MODEL, {}, BackendKind.local, Settings(home=tmp_path, region="us-east-1"))
    assert [p.region for p in used] == ["us-east-1"] * 3


def test_every_part_inside_the_allowed_regions_passes(tmp_path):
    settings = Settings(home=tmp_path, region="me-central-1", kserve_region="ME-Central-1")
    tags = {REGIONS_TAG: "me-central-1, me-south-1"}
    assert len(residency.check(MODEL, tags, BackendKind.kserve, settings)) == 3


@pytest.mark.parametrize(
    ("overrides", "backend", "named"),
    [
        ({"region": "eu-west-1"}, BackendKind.local, "the gateway that would serve it is in eu-west-1 (RELEASEGATE_REGION)"),
        ({"kserve_region": "us-east-1"}, BackendKind.kserve, "KServe cluster that would serve it is in us-east-1 "
         "(RELEASEGATE_KSERVE_REGION)"),
        ({"db_region": "eu-west-1"}, BackendKind.local, "database that would log its requests is in eu-west-1 "
         "(RELEASEGATE_DB_REGION)"),
        ({"artifact_region": "us-east-1"}, BackendKind.local, "artifact store that would keep its reports is in "
         "us-east-1 (RELEASEGATE_ARTIFACT_REGION)"),
    ],
)  # fmt: skip
def test_a_part_outside_is_refused_naming_the_allowed_regions_and_the_part(tmp_path, overrides, backend, named):
    settings = Settings(home=tmp_path, **({"region": "me-central-1"} | overrides))
    with pytest.raises(residency.ResidencyRefused) as err:
        residency.check(MODEL, {REGIONS_TAG: "me-central-1"}, backend, settings)
    assert f"{MODEL} may be processed and stored only in me-central-1 ({REGIONS_TAG})" in str(err.value)
    assert named in str(err.value)


def test_the_local_default_declares_one_region_and_a_release_outside_it_never_opens(store, classifier):
    """pipeline.start, as the release DAG's first task calls it: refused, audited, no release opened."""
    champion = register(store, classifier)
    registry.set_alias(MODEL, "champion", champion, settings=store)
    candidate = register(store, classifier)
    registry.client(store).set_registered_model_tag(MODEL, REGIONS_TAG, "me-central-1")
    with pytest.raises(residency.ResidencyRefused, match=r"gateway that would serve it is in local"):
        pipeline.start(MODEL, candidate)
    assert release.active(MODEL) is None and release.list_releases(MODEL) == []
    (event,) = audit.events(model=MODEL, version=candidate, action=AuditAction.release_refused)
    assert "me-central-1" in event["details"]["reason"] and "local" in event["details"]["reason"]

    registry.client(store).set_registered_model_tag(MODEL, REGIONS_TAG, "local")  # where the default is: opens
    assert pipeline.start(MODEL, candidate).candidate == candidate
