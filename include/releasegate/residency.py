"""Data residency: a model's data is processed and stored only in the regions its owner allows.

A registered model may carry the tag `releasegate.regions` (comma-separated). Each part a release puts the
model's data in declares its region in the settings: the serving backend (it processes every request), the
database (the prediction log and the feedback it stores) and the artifact store (reports and reference data).
`check` refuses a release that would use a part outside the allowed regions, naming the part, its region and
the setting that declares it; a model without the tag may go anywhere. See docs/operations.md, "Residency".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from releasegate.contract import REGIONS_TAG
from releasegate.release import ReleaseError

if TYPE_CHECKING:
    from releasegate.backends import BackendKind
    from releasegate.settings import Settings


class ResidencyRefused(ReleaseError):
    """The release would process or store the model's data outside the regions the model allows."""


@dataclass(frozen=True)
class Part:
    """Somewhere a release puts the model's data, and the region it declares."""

    what: str
    region: str
    setting: str  # the variable that declares its region


def parts(backend: BackendKind, settings: Settings) -> list[Part]:
    """The parts a release of a model served by `backend` uses."""
    from releasegate.backends import BackendKind

    def part(what: str, name: str) -> Part:
        own = getattr(settings, f"{name}_region")
        if own:
            return Part(what, own, f"RELEASEGATE_{name.upper()}_REGION")
        return Part(what, settings.region, "RELEASEGATE_REGION")

    if backend is BackendKind.kserve:
        serving = part("the KServe cluster that would serve it", "kserve")
    else:
        serving = part("the gateway that would serve it", "gateway")
    return [
        serving,
        part("the database that would log its requests", "db"),
        part("the artifact store that would keep its reports", "artifact"),
    ]


def allowed(tags: dict[str, str]) -> list[str] | None:
    """The regions a model's tags allow, lower-cased; None when the model declares none."""
    value = tags.get(REGIONS_TAG)
    if value is None:
        return None
    return [r.strip().lower() for r in value.split(",") if r.strip()]


def check(model: str, tags: dict[str, str], backend: BackendKind, settings: Settings) -> list[Part]:
    """The parts the release would use, all inside the model's regions; ResidencyRefused naming the first outside."""
    used = parts(backend, settings)
    regions = allowed(tags)
    if regions is None:
        return used
    for part in used:
        if part.region.strip().lower() not in regions:
            raise ResidencyRefused(
                f"{model} may be processed and stored only in {', '.join(regions) or 'no region'} "
                f"({REGIONS_TAG}), but {part.what} is in {part.region} ({part.setting})"
            )
    return used
