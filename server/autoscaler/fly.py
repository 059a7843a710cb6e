"""The `fly` provider: worker Machines of the board's own Fly app, through the Machines
API (https://fly.io/docs/machines/api/machines-resource/).

Requests, as documented there:
- base URL https://api.machines.dev/v1, header `Authorization: Bearer <token>`;
- `GET /apps/{app}/machines?metadata.fly_process_group=worker`: the worker group, each
  machine with its `id`, `state` and `region`;
- `POST /apps/{app}/machines` with `{"config": {...}, "region": "..."}`: a new machine
  (it boots unless `skip_launch`); the docs warn it "can fail ... in a region we happen
  to be at capacity for": then we try the next region of SCRIBEFARM_FLY_REGIONS;
- `POST /apps/{app}/machines/{id}/start`: a stopped machine boots again (reset to its
  image), which is much faster than creating one, so stopped workers are reused first;
- `POST /apps/{app}/machines/{id}/stop` with `{"signal", "timeout"}`;
- `GET /apps/{app}/machines/{id}/wait?state=started&timeout=60`: until it runs.

Rate limits (https://fly.io/docs/machines/api/working-with-machines-api/#rate-limits):
"1 request, per second, per action ... with a short-term burst limit up to 3 req/s, per
action", per machine; a token bucket per (action, machine or app) keeps under it, and a
429 is retried after its Retry-After (else an exponential backoff).

Workers are created in the app's `worker` process group (metadata fly_process_group), so
`fly deploy` updates them with the board, and with `restart: on-failure`: a worker that
exits 0 when idle leaves its machine stopped, ready to be started again. The token never
appears in a log or an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.settings import Settings

log = logging.getLogger(__name__)

GROUP = "worker"  # the process group in fly.toml
RUNNING_STATES = frozenset({"created", "starting", "started", "replacing", "updating"})
STARTABLE_STATES = frozenset({"stopped", "suspended"})
# Capacity failures as the API words them (status 412 "insufficient resources", 409
# "insufficient memory", 403 "over the allowed quota"): another region may have room.
CAPACITY_STATUSES = frozenset({403, 409, 412})
CAPACITY_MARKERS = ("insufficient", "capacity", "quota")
MAX_TRIES = 5
STOP_TIMEOUT_NS = 35 * 10**9  # a worker finishes or gives back its jobs within 30 s

Sleep = Callable[[float], Awaitable[None]]


class FlyError(Exception):
    def __init__(self, action: str, status: int, message: str):
        super().__init__(f"Fly Machines API: {action} answered {status}: {message}")
        self.status = status
        self.capacity = status in CAPACITY_STATUSES and any(
            marker in message.lower() for marker in CAPACITY_MARKERS
        )


class RateLimiter:
    """A token bucket per key: `rate` requests a second, bursts up to `burst`."""

    def __init__(
        self,
        rate: float = 1.0,
        burst: int = 3,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ):
        self.rate, self.burst, self.clock, self.sleep = rate, burst, clock, sleep
        self.buckets: dict[tuple[str, str], tuple[float, float]] = {}

    async def acquire(self, key: tuple[str, str]) -> None:
        while True:
            tokens, last = self.buckets.get(key, (float(self.burst), self.clock()))
            now = self.clock()
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return
            self.buckets[key] = (tokens, now)
            await self.sleep((1 - tokens) / self.rate)


class MachinesApi:
    def __init__(
        self,
        app: str,
        token: str,
        base_url: str,
        *,
        limiter: RateLimiter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ):
        self.app = app
        self.limiter = limiter or RateLimiter(sleep=sleep)
        self.sleep = sleep
        self.http = httpx.AsyncClient(
            base_url=f"{base_url}/apps/{app}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=90,  # a wait may take its whole 60 s
            transport=transport,
        )

    async def list_machines(self, group: str) -> list[dict[str, Any]]:
        params = {"metadata.fly_process_group": group}
        return await self._call("list", self.app, "GET", "/machines", params=params)

    async def create(self, config: dict[str, Any], region: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"config": config}
        if region:
            body["region"] = region
        return await self._call("create", self.app, "POST", "/machines", json=body)

    async def start(self, machine_id: str) -> None:
        await self._call("start", machine_id, "POST", f"/machines/{machine_id}/start")

    async def stop(self, machine_id: str) -> None:
        body = {"signal": "SIGTERM", "timeout": STOP_TIMEOUT_NS}
        await self._call("stop", machine_id, "POST", f"/machines/{machine_id}/stop", json=body)

    async def wait(self, machine_id: str, state: str = "started", seconds: int = 60) -> None:
        params = {"state": state, "timeout": seconds}
        await self._call("wait", machine_id, "GET", f"/machines/{machine_id}/wait", params=params)

    async def _call(self, action: str, target: str, method: str, path: str, **kwargs) -> Any:
        for attempt in range(MAX_TRIES):
            await self.limiter.acquire((action, target))
            response = await self.http.request(method, path, **kwargs)
            if response.status_code != 429:
                break
            await self.sleep(retry_after(response, attempt))
        if response.status_code >= 400:
            raise FlyError(action, response.status_code, error_message(response))
        return response.json() if response.content else None

    async def close(self) -> None:
        await self.http.aclose()


def retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return float(2**attempt)


def error_message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except (ValueError, AttributeError):
        return response.text


def worker_config(settings: Settings, image: str, server_url: str) -> dict[str, Any]:
    """A worker machine: CPU int8 (Fly offers no GPUs), exiting when idle."""
    return {
        "image": image,
        "init": {"cmd": ["scribefarm", "worker"]},
        "env": {
            "SCRIBEFARM_SERVER": server_url,
            "SCRIBEFARM_DEVICE": "cpu",
            "SCRIBEFARM_EXIT_WHEN_IDLE": f"{settings.autoscaler_idle_seconds:g}",
        },
        "guest": {
            "cpu_kind": settings.fly_worker_cpu_kind,
            "cpus": settings.fly_worker_cpus,
            "memory_mb": settings.fly_worker_memory_mb,
        },
        "restart": {"policy": "on-failure", "max_retries": 3},
        "auto_destroy": False,  # kept stopped when idle: starting it again is fast
        # flyctl's own markers: `fly deploy` updates the machines of a V2 process group.
        "metadata": {"fly_process_group": GROUP, "fly_platform_version": "v2"},
        "stop_config": {"signal": "SIGTERM", "timeout": STOP_TIMEOUT_NS},
    }


@dataclass
class FlyProvider:
    api: MachinesApi
    config: dict[str, Any]
    regions: list[str]
    machines: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> FlyProvider:
        image = settings.fly_worker_image
        if not (settings.fly_app and settings.fly_api_token and image):
            raise ValueError(
                "SCRIBEFARM_AUTOSCALER=fly needs the app (SCRIBEFARM_FLY_APP, set on Fly as "
                "FLY_APP_NAME), an API token (FLY_API_TOKEN: `fly tokens create deploy`) and "
                "the worker image (SCRIBEFARM_FLY_WORKER_IMAGE, set on Fly as FLY_IMAGE_REF)"
            )
        server_url = settings.public_url or f"https://{settings.fly_app}.fly.dev"
        api = MachinesApi(
            settings.fly_app, settings.fly_api_token.get_secret_value(), settings.fly_api_url
        )
        return cls(api, worker_config(settings, image, server_url), settings.fly_regions)

    async def running(self) -> int:
        self.machines = await self.api.list_machines(GROUP)
        return sum(machine["state"] in RUNNING_STATES for machine in self.machines)

    async def start(self, count: int) -> int:
        """Starts stopped workers first, then creates the rest; waits until they run."""
        stopped = [m["id"] for m in self.machines if m["state"] in STARTABLE_STATES][:count]
        for machine_id in stopped:
            await self.api.start(machine_id)
        created = [await self._create() for _ in range(count - len(stopped))]
        await asyncio.gather(*(self.api.wait(m) for m in stopped + created))
        return len(stopped) + len(created)

    async def _create(self) -> str:
        failure: FlyError | None = None
        for region in self.regions or [None]:
            try:
                machine = await self.api.create(self.config, region)
            except FlyError as exc:
                if not exc.capacity:
                    raise
                log.warning("no room for a worker in %s, trying the next region: %s", region, exc)
                failure = exc
                continue
            log.info("created worker machine %s in %s", machine["id"], machine.get("region"))
            return machine["id"]
        raise failure

    async def stop_all(self) -> int:
        started = [m["id"] for m in self.machines if m["state"] in RUNNING_STATES]
        for machine_id in started:
            await self.api.stop(machine_id)
        return len(started)

    async def close(self) -> None:
        await self.api.close()
