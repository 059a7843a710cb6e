"""The fly provider against a fake Machines API that follows Fly's documentation
(tests/fake_fly.py): the right calls in the right order, rate limits kept, 429s retried
after Retry-After, capacity errors retried in another region."""

from __future__ import annotations

import asyncio

import pytest

from server.autoscaler import Autoscaler
from server.autoscaler.fly import FlyError, FlyProvider, MachinesApi, RateLimiter, worker_config
from server.settings import Settings
from tests.fake_fly import FakeClock, FakeMachinesApi

APP, TOKEN, IMAGE = "scribefarm", "fo1_secret-token", "registry.fly.io/scribefarm:deployment-2"
SETTINGS = Settings(
    autoscaler="fly",
    fly_app=APP,
    fly_api_token=TOKEN,
    fly_worker_image=IMAGE,
    fly_regions="iad,ord",
    max_workers=5,
    autoscaler_assumed_speed=10,
    autoscaler_target_seconds=60,
    autoscaler_idle_seconds=90,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fly(clock) -> FakeMachinesApi:
    fake = FakeMachinesApi(APP, TOKEN, clock)
    fake.add_machine("started", "app")  # the board itself: never touched
    return fake


def provider(fly: FakeMachinesApi, clock: FakeClock, token: str = TOKEN) -> FlyProvider:
    api = MachinesApi(
        APP,
        token,
        "https://api.machines.dev/v1",
        limiter=RateLimiter(clock=clock, sleep=clock.sleep),
        transport=fly.transport(),
        sleep=clock.sleep,
    )
    config = worker_config(SETTINGS, IMAGE, "https://scribefarm.fly.dev")
    return FlyProvider(api, config, SETTINGS.fly_regions)


def scale(provider: FlyProvider, count: int) -> int:
    async def run() -> int:
        running = await provider.running()
        started = await provider.start(count - running)
        await provider.close()
        return started

    return asyncio.run(run())


def test_starts_stopped_workers_before_creating_new_ones_then_waits_for_them(fly, clock):
    stopped = fly.add_machine("stopped", "worker")
    assert scale(provider(fly, clock), 3) == 3

    created = [m["id"] for m in fly.machines.values() if m["config"]["image"] == IMAGE]
    assert fly.calls() == [
        ("list", APP),
        ("start", stopped),
        ("create", APP),
        ("create", APP),
        ("wait", stopped),
        ("wait", created[0]),
        ("wait", created[1]),
    ]
    list_request = fly.requests[0]
    assert list_request.params == {"metadata.fly_process_group": "worker"}
    wait = fly.requests[-1]
    assert wait.method == "GET" and wait.params == {"state": "started", "timeout": "60"}
    workers = [m for m in fly.machines.values() if m["config"]["metadata"]["fly_process_group"]]
    assert sum(m["state"] == "started" for m in workers) == 4  # the board and 3 workers


def test_a_new_worker_is_an_idle_exiting_cpu_worker_of_the_worker_group(fly, clock):
    scale(provider(fly, clock), 1)
    [create] = [r for r in fly.requests if r.action == "create"]
    assert create.body["region"] == "iad"  # the first region
    config = create.body["config"]
    assert config["image"] == IMAGE
    assert config["metadata"] == {"fly_process_group": "worker", "fly_platform_version": "v2"}
    assert config["restart"] == {"policy": "on-failure", "max_retries": 3}
    assert config["auto_destroy"] is False
    assert config["guest"] == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    assert config["init"] == {"cmd": ["scribefarm", "worker"]}
    assert config["env"] == {
        "SCRIBEFARM_SERVER": "https://scribefarm.fly.dev",
        "SCRIBEFARM_DEVICE": "cpu",
        "SCRIBEFARM_EXIT_WHEN_IDLE": "90",
    }
    assert "services" not in config  # no public service: workers pull
    assert TOKEN not in str(create.body)


def test_creates_keep_to_the_documented_rate_limit(fly, clock):
    """1 request a second per action, bursts of 3: five creates take two seconds."""
    scale(provider(fly, clock), 5)
    creates = [r for r in fly.requests if r.action == "create"]
    assert [r.status for r in creates] == [200] * 5
    assert [r.at for r in creates] == [0, 0, 0, 1, 2]
    assert all(r.status != 429 for r in fly.requests)


def test_a_429_is_retried_after_its_retry_after(fly, clock):
    fly.throttle["create"] = 7
    scale(provider(fly, clock), 1)
    creates = [(r.status, r.at) for r in fly.requests if r.action == "create"]
    assert creates == [(429, 0), (200, 7)]


def test_a_region_without_capacity_is_skipped_for_the_next(fly, clock):
    fly.full_regions = {"iad"}
    scale(provider(fly, clock), 2)
    creates = [(r.status, r.body["region"]) for r in fly.requests if r.action == "create"]
    assert creates == [(412, "iad"), (200, "ord"), (412, "iad"), (200, "ord")]
    workers = [m for m in fly.machines.values() if m["config"]["metadata"]["fly_process_group"]]
    assert sorted(m["region"] for m in workers) == ["ord", "ord", "ord"]


def test_no_region_with_capacity_fails_the_tick_with_the_reason(fly, clock):
    fly.full_regions = {"iad", "ord"}
    with pytest.raises(FlyError, match="412: insufficient resources") as failure:
        scale(provider(fly, clock), 1)
    assert failure.value.capacity


def test_other_errors_are_not_retried_elsewhere_and_never_show_the_token(fly, clock):
    with pytest.raises(FlyError) as failure:
        scale(provider(fly, clock, token="fo1_wrong-token"), 1)
    assert failure.value.status == 401 and not failure.value.capacity
    assert "fo1_wrong-token" not in str(failure.value)
    assert [r.action for r in fly.requests] == ["list"]


def test_stop_all_stops_running_workers_gracefully(fly, clock):
    running = [fly.add_machine("started", "worker") for _ in range(2)]
    fly.add_machine("stopped", "worker")
    fly_provider = provider(fly, clock)

    async def run() -> int:
        await fly_provider.running()
        return await fly_provider.stop_all()

    assert asyncio.run(run()) == 2
    stops = [r for r in fly.requests if r.action == "stop"]
    assert [r.target for r in stops] == running
    assert stops[0].body == {"signal": "SIGTERM", "timeout": 35_000_000_000}


def test_the_autoscaler_drives_the_fly_provider(fly, clock):
    """A board with 25 minutes of audio queued, at 10x realtime and a 60 s target: 3."""

    class Board:
        async def queue_state(self, window_seconds, model):
            return {"queued_jobs": 25, "queued_audio_seconds": 1500.0, "leased_jobs": 0}

    autoscaler = Autoscaler(Board(), provider(fly, clock), SETTINGS)
    assert asyncio.run(autoscaler.step()) == 3
    assert len(fly.calls("create")) == 3


def test_settings_name_what_is_missing_without_the_token():
    with pytest.raises(ValueError, match="SCRIBEFARM_FLY_WORKER_IMAGE") as failure:
        FlyProvider.from_settings(Settings(fly_app=APP, fly_api_token=TOKEN))
    assert TOKEN not in str(failure.value)
    assert TOKEN not in repr(Settings(fly_api_token=TOKEN))
