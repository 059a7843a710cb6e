"""A fake Fly Machines API, as its documentation describes it, for httpx.MockTransport.

- https://fly.io/docs/machines/api/working-with-machines-api/: base URL
  https://api.machines.dev/v1, `Authorization: Bearer <token>` on every request (401
  otherwise); rate limits "1 request, per second, per action ... with a short-term burst
  limit up to 3 req/s, per action", per machine: over it, 429 with Retry-After.
- https://fly.io/docs/machines/api/machines-resource/: GET /apps/{app}/machines (filter
  `metadata.{key}`), POST /apps/{app}/machines with {"config": {"image", ...}, "region"}
  (a machine that boots unless skip_launch; it "can fail ... in a region we happen to be
  at capacity for"), POST .../{id}/start (a stopped machine), POST .../{id}/stop
  ({"signal", "timeout"}), GET .../{id}/wait?state=started&timeout=N ({"ok": true});
  machine states created, starting, started, stopping, stopped.

Time is a FakeClock shared with the client under test, so rate limits and Retry-After
waits are checked without real sleeping.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx

PATH = re.compile(r"^/v1/apps/(?P<app>[^/]+)/machines(?:/(?P<id>[^/]+)(?:/(?P<verb>\w+))?)?$")


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Request:
    at: float
    method: str
    action: str
    target: str
    status: int
    body: dict[str, Any] | None
    params: dict[str, str]


@dataclass
class FakeMachinesApi:
    app: str
    token: str
    clock: FakeClock
    full_regions: set[str] = field(default_factory=set)
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    throttle: dict[str, float] = field(default_factory=dict)  # action -> Retry-After, once
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def add_machine(self, state: str, group: str, region: str = "ord") -> str:
        machine_id = f"m{next(self.ids):013x}"
        config = {"image": "registry.fly.io/app:old", "metadata": {"fly_process_group": group}}
        self.machines[machine_id] = {
            "id": machine_id,
            "name": f"machine-{machine_id}",
            "state": state,
            "region": region,
            "instance_id": f"i-{machine_id}",
            "config": config,
        }
        return machine_id

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def calls(self, *actions: str) -> list[tuple[str, str]]:
        """(action, target) of the answered requests, optionally of some actions only."""
        return [
            (r.action, r.target)
            for r in self.requests
            if r.status < 400 and (not actions or r.action in actions)
        ]

    # --- the API ---------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        match = PATH.match(request.url.path)
        assert match and match["app"] == self.app, f"undocumented path {request.url.path}"
        action, target = self._action(request.method, match)
        body = json.loads(request.content) if request.content else None
        params = dict(parse_qsl(request.url.query.decode()))
        response = self._answer(request, action, target, body, params, match["id"])
        self.requests.append(
            Request(
                self.clock(), request.method, action, target, response.status_code, body, params
            )
        )
        return response

    @staticmethod
    def _action(method: str, match: re.Match) -> tuple[str, str]:
        if match["id"] is None:
            return ("list" if method == "GET" else "create"), match["app"]
        return (match["verb"] or ("get" if method == "GET" else "update")), match["id"]

    def _answer(self, request, action, target, body, params, machine_id) -> httpx.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return error(401, "unauthorized")
        if not self._within_rate_limit(action, target):
            return error(429, "rate limit exceeded", {"Retry-After": "1"})
        if action in self.throttle:
            retry = self.throttle.pop(action)
            return error(429, "rate limit exceeded", {"Retry-After": f"{retry:g}"})
        if machine_id is not None and machine_id not in self.machines:
            return error(404, "machine not found")
        return getattr(self, f"_{action}")(body, params, machine_id)

    def _within_rate_limit(self, action: str, target: str) -> bool:
        """Replays the answered requests of (action, target) through a token bucket of 3
        refilled at 1 a second: this request must find a token."""
        times = [
            r.at
            for r in self.requests
            if (r.action, r.target) == (action, target) and r.status != 429
        ]
        tokens, last = 3.0, None
        for at in [*times, self.clock()]:
            if last is not None:
                tokens = min(3.0, tokens + (at - last))
            tokens, last = tokens - 1, at
        return tokens >= -1e-9

    def _list(self, body, params, _id) -> httpx.Response:
        wanted = {k.removeprefix("metadata."): v for k, v in params.items() if "metadata." in k}
        found = [
            m
            for m in self.machines.values()
            if all(m["config"]["metadata"].get(k) == v for k, v in wanted.items())
        ]
        return httpx.Response(200, json=found)

    def _create(self, body, params, _id) -> httpx.Response:
        if not body or not body.get("config", {}).get("image"):
            return error(400, "config.image is required")
        region = body.get("region", "ord")
        if region in self.full_regions:
            return error(
                412,
                "insufficient resources available to fulfill request: could not reserve "
                "resource for machine",
            )
        machine_id = self.add_machine("starting", "", region)
        machine = self.machines[machine_id]
        machine["config"] = body["config"]
        return httpx.Response(200, json=machine)

    def _start(self, body, params, machine_id) -> httpx.Response:
        machine = self.machines[machine_id]
        if machine["state"] not in ("stopped", "suspended"):
            return error(412, f"machine is {machine['state']}, not stopped")
        previous, machine["state"] = machine["state"], "starting"
        return httpx.Response(
            200, json={"previous_state": previous, "migrated": False, "new_host": ""}
        )

    def _stop(self, body, params, machine_id) -> httpx.Response:
        self.machines[machine_id]["state"] = "stopped"
        return httpx.Response(200, json={"ok": True})

    def _wait(self, body, params, machine_id) -> httpx.Response:
        state = params.get("state", "started")
        if state not in ("started", "stopped", "destroyed") or not params.get("timeout", "60"):
            return error(400, "bad state")
        machine = self.machines[machine_id]
        if state == "started" and machine["state"] in ("created", "starting"):
            machine["state"] = "started"  # it boots while we wait
        if machine["state"] != state:
            return error(408, f"machine is {machine['state']}")
        return httpx.Response(200, json={"ok": True})


def error(status: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": message}, headers=headers)
