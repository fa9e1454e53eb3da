"""The ingress gateway's sticky-arm Lua filter (include/k8s/arms.lua) and the entry VirtualService, run
without Envoy or Istio.

Envoy cannot run on this machine; LuaJIT can (lupa's `luajit21`, the runtime Envoy embeds), so the
filter's own code runs as the EnvoyFilter carries it. Faked: Envoy's request handle, reduced to the
header calls the filter makes (`headers():get/remove/add`) on a dict, and Istio's route choice, done as
Istio documents it: the first http route whose every `match.headers` condition holds; a route without
`match` takes the rest, drawn by its weights.
"""

from __future__ import annotations

from typing import Any


class _Headers:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = {k.lower(): v for k, v in values.items()}

    def get(self, name: str) -> str | None:
        return self.values.get(name.lower())

    def remove(self, name: str) -> None:
        self.values.pop(name.lower(), None)

    def add(self, name: str, value: str) -> None:
        self.values[name.lower()] = value


class _Handle:
    def __init__(self, headers: _Headers) -> None:
        self._headers = headers

    def headers(self) -> _Headers:
        return self._headers


class LuaFilter:
    """One EnvoyFilter's Lua source, loaded once (as each Envoy worker does)."""

    def __init__(self, envoy_filter: dict[str, Any]) -> None:
        from lupa import luajit21

        [patch] = envoy_filter["spec"]["configPatches"]
        config = patch["patch"]["value"]["typed_config"]
        assert config["@type"] == "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
        self.runtime = luajit21.LuaRuntime()
        self.runtime.execute(config["default_source_code"]["inline_string"])
        self._on_request = self.runtime.globals().envoy_on_request

    def request(self, headers: dict[str, str]) -> dict[str, str]:
        """The request's headers after the filter's `envoy_on_request`."""
        seen = _Headers(headers)
        self._on_request(_Handle(seen))
        return seen.values


def routed_host(virtual_service: dict[str, Any], headers: dict[str, str]) -> str | None:
    """The Host the entry VirtualService sends a request with, or None when it falls to a weighted draw."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for route in virtual_service["spec"]["http"]:
        conditions = [c for m in route.get("match") or [] for c in (m.get("headers") or {}).items()]
        if route.get("match") and not all(lowered.get(name) == cond.get("exact") for name, cond in conditions):
            continue
        destinations = route["route"]
        if len(destinations) > 1:
            return None
        return str(destinations[0]["headers"]["request"]["set"]["Host"])
    raise AssertionError("no http route of the VirtualService takes the request")
