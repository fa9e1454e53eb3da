"""The `local` backend: the embedded gateway's admin API over HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from releasegate.backends import Applied, ArmWeight, DeploymentError, SignatureRefused
from releasegate.contract import ErrorCode, Mode

if TYPE_CHECKING:
    from releasegate.settings import Settings

# Loading a version means downloading, verifying and warming it: allow for slow disks and imports.
_PUT_TIMEOUT = httpx.Timeout(10.0, read=300.0)
_GET_TIMEOUT = httpx.Timeout(10.0)


class LocalBackend:
    """Drives the gateway at `gateway_url` (default: settings.gateway_url) with an admin key."""

    def __init__(self, gateway_url: str | None = None, api_key: str | None = None, settings: Settings | None = None):
        if not (gateway_url and api_key):
            if settings is None:
                from releasegate.settings import get_settings

                settings = get_settings()
            gateway_url = gateway_url or settings.gateway_url
            api_key = api_key or settings.admin_api_key
        self.gateway_url = gateway_url.rstrip("/")
        self.api_key = api_key
        if not self.api_key:
            raise DeploymentError("no admin API key for the gateway: set RELEASEGATE_ADMIN_KEY or pass api_key")

    def _request(self, method: str, path: str, timeout: httpx.Timeout, **kwargs: Any) -> httpx.Response:
        url = f"{self.gateway_url}{path}"
        try:
            return httpx.request(
                method, url, headers={"authorization": f"Bearer {self.api_key}"}, timeout=timeout, **kwargs
            )
        except httpx.HTTPError as err:
            raise DeploymentError(f"gateway at {self.gateway_url} unreachable: {type(err).__name__}: {err}") from err

    @staticmethod
    def _error(resp: httpx.Response) -> tuple[str, str | None]:
        """The gateway's error message and its machine-readable code, if it gave one."""
        try:
            body = resp.json()
            return str(body["error"]), body.get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            return resp.text[:500] or resp.reason_phrase, None

    def set_route(
        self,
        model: str,
        champion_version: str,
        candidate_version: str | None = None,
        mode: Mode = Mode.single,
        candidate_weight: int = 0,
        release_id: str | None = None,
        arms: list[ArmWeight] | None = None,
    ) -> Applied:
        """PUT the route; returns it once the gateway serves it, DeploymentError with the gateway's reason if not."""
        body = {
            "champion_version": str(champion_version),
            "candidate_version": None if candidate_version is None else str(candidate_version),
            "mode": Mode(mode).value,
            "candidate_weight": int(candidate_weight),
            "release_id": release_id,
            "arms": None if arms is None else [a.model_dump() for a in arms],
        }
        resp = self._request("PUT", f"/admin/routes/{model}", _PUT_TIMEOUT, json=body)
        if resp.status_code != 200:
            message, code = self._error(resp)
            error = SignatureRefused if code == ErrorCode.signature_refused else DeploymentError
            raise error(f"gateway refused route for {model} ({resp.status_code}): {message}", resp.status_code)
        return _applied(resp.json())

    def get_route(self, model: str) -> Applied | None:
        """The route the gateway serves for `model`, or None if it has none."""
        resp = self._request("GET", f"/admin/routes/{model}", _GET_TIMEOUT)
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            message, _ = self._error(resp)
            raise DeploymentError(
                f"reading the route of {model} failed ({resp.status_code}): {message}", resp.status_code
            )
        return _applied(resp.json())


def _applied(route: dict[str, Any]) -> Applied:
    return Applied(
        model=route["model"],
        champion_version=route["champion_version"],
        candidate_version=route.get("candidate_version"),
        mode=Mode(route["mode"]),
        candidate_weight=route.get("candidate_weight", 0),
        release_id=route.get("release_id"),
        arms=route.get("arms"),
        revision=route.get("revision"),
    )
