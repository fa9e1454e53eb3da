"""The `local` backend: the embedded gateway's admin API over HTTP."""

from __future__ import annotations

import httpx

from releasegate.backends import DeploymentError

# Loading a version means downloading, verifying and warming it: allow for slow disks and imports.
_PUT_TIMEOUT = httpx.Timeout(10.0, read=300.0)
_GET_TIMEOUT = httpx.Timeout(10.0)


class LocalBackend:
    """Drives the gateway at `gateway_url` (default: settings.gateway_url) with an admin key."""

    def __init__(self, gateway_url: str | None = None, api_key: str | None = None, settings=None):
        if settings is None and (gateway_url is None or api_key is None):
            from releasegate.settings import get_settings

            settings = get_settings()
        self.gateway_url = (gateway_url or settings.gateway_url).rstrip("/")
        self.api_key = api_key or settings.admin_api_key
        if not self.api_key:
            raise DeploymentError("no admin API key for the gateway: set RELEASEGATE_ADMIN_KEY or pass api_key")

    def _request(self, method: str, path: str, timeout: httpx.Timeout, **kwargs) -> httpx.Response:
        url = f"{self.gateway_url}{path}"
        try:
            return httpx.request(method, url, headers={"authorization": f"Bearer {self.api_key}"},
                                 timeout=timeout, **kwargs)
        except httpx.HTTPError as err:
            raise DeploymentError(f"gateway at {self.gateway_url} unreachable: {type(err).__name__}: {err}") from err

    @staticmethod
    def _message(resp: httpx.Response) -> str:
        try:
            return resp.json()["error"]
        except Exception:
            return resp.text[:500] or resp.reason_phrase

    def set_route(self, model: str, champion_version: str, candidate_version: str | None = None,
                  mode: str = "single", candidate_weight: int = 0, release_id: str | None = None) -> dict:
        """PUT the route; returns it once the gateway serves it, DeploymentError with the gateway's reason if not."""
        body = {"champion_version": str(champion_version),
                "candidate_version": None if candidate_version is None else str(candidate_version),
                "mode": mode, "candidate_weight": int(candidate_weight), "release_id": release_id}
        resp = self._request("PUT", f"/admin/routes/{model}", _PUT_TIMEOUT, json=body)
        if resp.status_code != 200:
            raise DeploymentError(f"gateway refused route for {model} ({resp.status_code}): {self._message(resp)}",
                                  resp.status_code)
        return resp.json()

    def get_route(self, model: str) -> dict | None:
        """The route the gateway serves for `model`, or None if it has none."""
        resp = self._request("GET", f"/admin/routes/{model}", _GET_TIMEOUT)
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise DeploymentError(f"reading the route of {model} failed ({resp.status_code}): {self._message(resp)}",
                                  resp.status_code)
        return resp.json()
