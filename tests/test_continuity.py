"""What a starting gateway does with the sessions in the store (`continuity.recover`), against the
real stores (SQLite and Redis) with two or three replicas racing; Docker is asked through a
callable, which is the seam (the end-to-end tests in test_restart.py use real containers)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from bridge.config import Config, SessionConfig, StoreConfig
from bridge.continuity import Continuity, recover
from bridge.store import SessionRecord, open_store


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("redis_url") if request.param == "redis" else ""


def record(session_id: str, **fields: object) -> SessionRecord:
    now = time.time()
    base = SessionRecord(
        id=session_id, user="alice", door="web", gateway="gw-old", started=now, last_activity=now,
        lifetime_deadline=now + 3600, container_id=f"c-{session_id}", attached_by="gw-old", attached_at=now,
    )
    return dataclasses.replace(base, **fields)


class Docker:
    """Which containers run, and which were removed (by whom); a removal then forgets the
    session's record, as the manager's does."""

    def __init__(self, running: set[str]) -> None:
        self.running = running
        self.removed: list[tuple[str, str]] = []

    def remover(self, gateway: str, store):
        async def remove(session_id: str, container_id: str, why: str) -> None:
            self.removed.append((container_id, gateway))
            self.running.discard(container_id)
            await store.delete_session(session_id)

        return remove

    async def alive(self, container_id: str) -> bool:
        return container_id in self.running


async def test_replicas_end_an_unclaimed_session_exactly_once(store_url: str, tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path, store=StoreConfig(url=store_url))
    session = SessionConfig(reconnect_grace=0.3)
    stores = [await open_store(config) for _ in range(3)]
    try:
        await stores[0].put_session(record("kept", attached_by=None))
        await stores[0].put_session(record("dead"))
        await stores[0].put_session(record("ssh", door="ssh", gateway="gw-0"))
        await stores[0].put_session(record("served", attached_by="gw-live"))
        docker = Docker({"c-kept", "c-ssh", "c-served"})
        waits = []
        for i, store in enumerate(stores):
            waits += await recover(Continuity(store, f"gw-{i}", session), docker.alive, docker.remover(f"gw-{i}", store),
                                   lambda _id: False)
        await asyncio.gather(*waits)
        assert [c for c, _ in docker.removed].count("c-kept") == 1  # one replica ended it
        assert ("c-ssh", "gw-0") in docker.removed  # its own SSH-door session: the connection died
        assert "c-served" in docker.running  # another gateway serves it
        ids = {r.id for r in await stores[1].list_sessions()}
        assert ids == {"served"}
    finally:
        for store in stores:
            await store.close()


async def test_a_session_taken_during_the_grace_is_not_ended(store_url: str, tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path, store=StoreConfig(url=store_url))
    session = SessionConfig(reconnect_grace=0.5)
    async with await open_store(config) as store:
        # The previous run of this gateway (same instance id) died holding it.
        await store.put_session(record("s1", attached_by="gw-0", gateway="gw-0"))
        docker = Docker({"c-s1"})
        restarted, replica = Continuity(store, "gw-0", session), Continuity(store, "gw-1", session)
        waits = await recover(restarted, docker.alive, docker.remover("gw-0", store), lambda _id: False)
        rec = await store.get_session("s1")
        assert rec is not None and rec.attached_by is None  # let go: any gateway may take it
        assert await replica.take(rec)  # a page came back to the other replica
        assert not await restarted.take(rec)  # the lease as read is gone: no second taker
        await asyncio.gather(*waits)
        assert docker.removed == [] and "c-s1" in docker.running
        rec = await store.get_session("s1")
        assert rec is not None and rec.attached_by == "gw-1" and not rec.ended
