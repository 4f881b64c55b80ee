"""Replicas: sticky, least-loaded assignment; fail-over that continues a generation token-exactly."""

from __future__ import annotations

import pytest

from forgerl.gateway.errors import GatewayError
from forgerl.gateway.routing import Route, Router, Sampling
from forgerl.gateway.testing import ScriptedInference, ScriptedReplica, scripted_logprob

pytestmark = pytest.mark.unit


def make(n: int) -> tuple[Router, list[ScriptedInference]]:
    servers = [ScriptedInference() for _ in range(n)]
    return Router([ScriptedReplica(f"r{i}", s) for i, s in enumerate(servers)]), servers


async def collect(router: Router, route: Route, prompt=(1, 2, 3), max_tokens: int = 0):
    chunks = [c async for c in router.generate(route, list(prompt), Sampling(max_tokens=max_tokens), "req")]
    return chunks, [t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs]


def test_episodes_spread_over_replicas_and_stick() -> None:
    router, _ = make(3)
    routes = [Route() for _ in range(6)]
    for route in routes:
        router.assign(route)
    assert sorted(r.episodes for r in router.replicas.values()) == [2, 2, 2]
    router.release(routes[0])
    assert router.assign(Route()) == routes[0].history[0]


async def test_generation_stays_on_the_episodes_replica() -> None:
    router, servers = make(2)
    route = Route()
    router.assign(route)
    home = int(route.replica[1:])
    servers[home].add([5, 6, 7], [8, 9])
    await collect(router, route)
    await collect(router, route)
    assert len(servers[home].log) == 2 and servers[1 - home].log == []


async def test_fail_over_mid_stream_continues_on_another_replica() -> None:
    router, servers = make(2)
    route = Route()
    router.assign(route)
    home, other = servers[int(route.replica[1:])], servers[1 - int(route.replica[1:])]
    home.add([10, 11, 12, 13, 14, 15])
    home.fail_after = 3
    other.add([13, 14, 15])
    chunks, ids, logprobs = await collect(router, route, max_tokens=10)
    assert ids == [10, 11, 12, 13, 14, 15] and chunks[-1].finish_reason == "stop"
    assert other.log[0].prompt_token_ids == [1, 2, 3, 10, 11, 12]  # prompt + what the dead replica generated
    assert other.log[0].max_tokens == 7
    assert logprobs[:3] == pytest.approx([scripted_logprob(i, t) for i, t in enumerate([10, 11, 12])])
    assert route.replica == other_address(router, other) and route.moves == 1
    assert not router.replicas[route.history[0]].healthy
    # later episodes avoid the dead replica until a probe finds it back
    assert router.assign(Route()) == route.replica
    await router.probe()
    assert router.replicas[route.history[0]].healthy


def other_address(router: Router, server: ScriptedInference) -> str:
    return next(a for a, r in router.replicas.items() if r.client.servicer is server)  # type: ignore[attr-defined]


async def test_a_replica_down_before_the_first_token() -> None:
    router, servers = make(2)
    route = Route()
    router.assign(route)
    servers[int(route.replica[1:])].down = True
    survivor = servers[1 - int(route.replica[1:])]
    survivor.add([4, 5])
    _, ids, _ = await collect(router, route)
    assert ids == [4, 5] and survivor.log[0].prompt_token_ids == [1, 2, 3]


async def test_no_replica_left_is_503() -> None:
    router, servers = make(2)
    for s in servers:
        s.down = True
    route = Route()
    router.assign(route)
    with pytest.raises(GatewayError) as err:
        await collect(router, route)
    assert err.value.status == 503 and "no inference replica" in err.value.message


async def test_refused_requests_are_400_not_fail_over() -> None:
    router, _ = make(2)
    route = Route()
    router.assign(route)
    with pytest.raises(GatewayError) as err:
        await collect(router, route, prompt=[])
    assert err.value.status == 400 and all(r.healthy for r in router.replicas.values())
