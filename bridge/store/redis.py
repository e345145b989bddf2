"""The Redis store: shared by several gateway processes on several hosts.

Every check-then-write is one Lua script, which Redis runs atomically, so the caps hold across
replicas without locks held by a client that might die. Logins, failure counters and lockouts
carry Redis expiries, so memory stays bounded by what happened within one window. Redis must not
evict keys on its own (`maxmemory-policy noeviction`, the default): an evicted lock would release
a lockout early.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from .base import LoginRecord, Refusal, SecretBox, SessionRecord, Slot, Store, check_update

P = ParamSpec("P")
T = TypeVar("T")

PREFIX = "termbridge:"
SESSIONS = PREFIX + "sessions"  # set of session ids
SLOTS = PREFIX + "slots"  # hash: slot id -> user ("" for a pooled container)
SLOT_USERS = PREFIX + "slot-users"  # hash: user -> slots held
SLOT_SINCE = PREFIX + "slot-since"  # hash: slot id -> when it was taken
SLOT_KEYS = [SLOTS, SLOT_USERS, SLOT_SINCE]
META = PREFIX + "meta"
PROFILE_CHOICES = PREFIX + "profile-choices"  # hash: user -> the profile last chosen on the web
CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 5.0
# Connections per gateway: a burst waits for a free one (up to COMMAND_TIMEOUT) instead of
# opening hundreds.
MAX_CONNECTIONS = 16
# A flood on one key keeps at most this many failures (the largest max_failures_per_address).
MAX_FAILURES_KEPT = 100_000

_SLOT_HELPERS = """
local function release(id)
  local user = redis.call('HGET', KEYS[1], id)
  if not user then return 0 end
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[3], id)
  if user ~= '' and redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then redis.call('HDEL', KEYS[2], user) end
  return 1
end
local function held(user) return tonumber(redis.call('HGET', KEYS[2], user) or '0') end
"""
# Every slot script: KEYS[1..3] = SLOT_KEYS.
# ARGV: slot id, user ('' = pool), max_per_user, max_total, now.
_RESERVE = _SLOT_HELPERS + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return '' end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 'max_total' end
if ARGV[2] ~= '' then
  if held(ARGV[2]) >= tonumber(ARGV[3]) then return 'max_per_user' end
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
return ''
"""
# ARGV: pool slot id, slot id, user, max_per_user, max_total, now.
_CLAIM = _SLOT_HELPERS + """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then release(ARGV[1]) return '' end
if held(ARGV[3]) >= tonumber(ARGV[4]) then return 'max_per_user' end
if release(ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then return 'max_total' end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[6])
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return ''
"""
# ARGV: slot id.
_RELEASE_ONE = _SLOT_HELPERS + "return release(ARGV[1])"
# KEYS[4..6]: sessions set, session hash, secret hash. ARGV: session id.
_DELETE_SESSION = _SLOT_HELPERS + """
release(ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[5], KEYS[6])
return 1
"""
# KEYS: session hash. ARGV: n, then n expected (field, json value) pairs, then the new ones.
# Expected values are compared decoded, so that 5 and 5.0 are one number, as in Python.
_UPDATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
for i = 2, 2 * n, 2 do
  if cjson.decode(redis.call('HGET', KEYS[1], ARGV[i]) or 'null') ~= cjson.decode(ARGV[i + 1]) then return 0 end
end
if #ARGV > 2 * n + 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2 * n + 2)) end
return 1
"""
# KEYS: login set of the user. ARGV: the login key prefix.
_DELETE_LOGINS_OF = """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do n = n + redis.call('DEL', ARGV[1] .. id) end
redis.call('DEL', KEYS[1])
return n
"""
# KEYS: login. ARGV: the prefix of the users' login sets, login id.
_DELETE_LOGIN = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
redis.call('SREM', ARGV[1] .. cjson.decode(raw)[1], ARGV[2])
return redis.call('DEL', KEYS[1])
"""
# KEYS: failure zset. ARGV: now, now - window, unique member, window in ms, cap.
_ADD_FAILURE = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[5]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('ZCARD', KEYS[1])
"""
# KEYS: lock. ARGV: until (s), until (ms). Only ever extends.
_LOCK = """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
end
return 1
"""


Method = Callable[Concatenate["RedisStore", P], Awaitable[T]]


def _guarded(method: Method[P, T]) -> Method[P, T]:
    """Redis errors (down, timeout, refused auth) become StoreUnavailable naming the server."""

    @functools.wraps(method)
    async def wrapper(store: RedisStore, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(store, *args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(detail=f"redis at {store.where}: {exc}") from None

    return wrapper


def where(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


async def probe(url: str) -> None:
    """Raise StoreUnavailable unless a Redis answers PING at `url`; writes nothing (for
    `termbridge check`, which must not change the store)."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(detail=f"redis at {where(url)}: {exc}") from None
    finally:
        await client.aclose()


def _session_key(session_id: str) -> str:
    return f"{PREFIX}session:{session_id}"


def _secret_key(session_id: str) -> str:
    return f"{PREFIX}secret:{session_id}"


def _login_key(login_id: str) -> str:
    return f"{PREFIX}login:{login_id}"


def _logins_of_key(user: str) -> str:
    return f"{PREFIX}logins-of:{user}"


def _pairs(fields: Mapping[str, Any]) -> list[str]:
    return [item for name, value in fields.items() for item in (name, json.dumps(value))]


def _refusal(raw: bytes) -> Refusal | None:
    return cast(Refusal, raw.decode()) or None


def _decode_session(raw: dict[bytes, bytes]) -> SessionRecord:
    return SessionRecord.from_dict({k.decode(): json.loads(v) for k, v in raw.items()})


class RedisStore(Store):
    def __init__(self, url: str, box: SecretBox) -> None:
        super().__init__(box)
        self.where = where(url)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            health_check_interval=30,
        )
        self._redis: aioredis.Redis | None = aioredis.Redis.from_pool(pool)
        scripts = {
            "reserve": _RESERVE, "claim": _CLAIM, "release": _RELEASE_ONE, "delete_session": _DELETE_SESSION,
            "update_session": _UPDATE_SESSION, "delete_login": _DELETE_LOGIN, "delete_logins_of": _DELETE_LOGINS_OF,
            "add_failure": _ADD_FAILURE, "lock": _LOCK,
        }
        self._scripts = {name: self._redis.register_script(text) for name, text in scripts.items()}

    @classmethod
    async def open(cls, url: str, box: SecretBox) -> RedisStore:
        store = cls(url, box)
        try:
            await store.ping()
            await store._check_key()
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreUnavailable(detail="the state store is closed")
        return self._redis

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args, client=self.redis)

    # -- sessions ------------------------------------------------------------------------------

    @_guarded
    async def put_session(self, rec: SessionRecord) -> None:
        key = _session_key(rec.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={k: json.dumps(v) for k, v in rec.to_dict().items()})
            pipe.sadd(SESSIONS, rec.id)
            await pipe.execute()

    @_guarded
    async def get_session(self, session_id: str) -> SessionRecord | None:
        raw = await self.redis.hgetall(_session_key(session_id))
        return _decode_session(raw) if raw else None

    @_guarded
    async def list_sessions(self, user: str | None = None) -> list[SessionRecord]:
        ids = sorted(member.decode() for member in await self.redis.smembers(SESSIONS))
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.hgetall(_session_key(session_id))
            rows = await pipe.execute()
        records = [_decode_session(raw) for raw in rows if raw]
        return [rec for rec in records if user is None or rec.user == user]

    @_guarded
    async def update_session(
        self, session_id: str, *, expect: Mapping[str, Any] | None = None, **fields: Any
    ) -> bool:
        expect = expect or {}
        check_update(fields, expect)
        args = [len(expect), *_pairs(expect), *_pairs(fields)]
        return bool(await self._script("update_session", [_session_key(session_id)], args))

    @_guarded
    async def delete_session(self, session_id: str) -> None:
        keys = [*SLOT_KEYS, SESSIONS, _session_key(session_id), _secret_key(session_id)]
        await self._script("delete_session", keys, [session_id])

    # -- slots ---------------------------------------------------------------------------------

    @_guarded
    async def reserve_slot(
        self, slot_id: str, user: str | None, max_per_user: int, max_total: int
    ) -> Refusal | None:
        args = [slot_id, user or "", max_per_user, max_total, repr(time.time())]
        refused = await self._script("reserve", SLOT_KEYS, args)
        return _refusal(refused)

    @_guarded
    async def claim_slot(
        self, pool_slot_id: str, slot_id: str, user: str, max_per_user: int, max_total: int
    ) -> Refusal | None:
        args = [pool_slot_id, slot_id, user, max_per_user, max_total, repr(time.time())]
        refused = await self._script("claim", SLOT_KEYS, args)
        return _refusal(refused)

    @_guarded
    async def release_slot(self, slot_id: str) -> None:
        await self._script("release", SLOT_KEYS, [slot_id])

    @_guarded
    async def list_slots(self) -> dict[str, Slot]:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(SLOTS)
            pipe.hgetall(SLOT_SINCE)
            users, since = await pipe.execute()
        return {k.decode(): Slot(v.decode() or None, float(since.get(k, 0))) for k, v in users.items()}

    # -- logins --------------------------------------------------------------------------------

    @_guarded
    async def put_login(self, login: LoginRecord) -> None:
        at_ms = int(login.expires * 1000)
        group = _logins_of_key(login.user)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_login_key(login.id), json.dumps([login.user, login.uid, login.gid, login.expires]), pxat=at_ms)
            pipe.sadd(group, login.id)
            pipe.pexpireat(group, at_ms, nx=True)
            pipe.pexpireat(group, at_ms, gt=True)
            await pipe.execute()

    @_guarded
    async def get_login(self, login_id: str, now: float) -> LoginRecord | None:
        raw = await self.redis.get(_login_key(login_id))
        if raw is None:
            return None
        user, uid, gid, expires = json.loads(raw)
        return LoginRecord(login_id, user, uid, gid, expires) if expires > now else None

    @_guarded
    async def delete_login(self, login_id: str) -> None:
        await self._script("delete_login", [_login_key(login_id)], [_logins_of_key(""), login_id])

    @_guarded
    async def delete_logins_of(self, user: str) -> int:
        return await self._script("delete_logins_of", [_logins_of_key(user)], [_login_key("")])

    # -- throttle counters ---------------------------------------------------------------------

    @_guarded
    async def add_failure(self, key: str, now: float, window: float) -> int:
        member = f"{now!r}:{secrets.token_hex(4)}"
        args = [repr(now), repr(now - window), member, max(1, int(window * 1000)), MAX_FAILURES_KEPT]
        return await self._script("add_failure", [f"{PREFIX}fail:{key}"], args)

    @_guarded
    async def failures(self, key: str, now: float, window: float) -> int:
        return await self.redis.zcount(f"{PREFIX}fail:{key}", f"({now - window!r}", repr(now))

    @_guarded
    async def lock(self, key: str, until: float) -> None:
        await self._script("lock", [f"{PREFIX}lock:{key}"], [repr(until), int(until * 1000)])

    @_guarded
    async def locked_until(self, key: str, now: float) -> float | None:
        raw = await self.redis.get(f"{PREFIX}lock:{key}")
        until = float(raw) if raw is not None else 0.0
        return until if until > now else None

    @_guarded
    async def clear(self, key: str) -> None:
        await self.redis.delete(f"{PREFIX}fail:{key}", f"{PREFIX}lock:{key}")

    # -- secrets, meta, lifecycle --------------------------------------------------------------

    @_guarded
    async def _put_secret(self, session_id: str, sealed_key: bytes, host_key: bytes) -> None:
        await self.redis.hset(_secret_key(session_id), mapping={"client_key": sealed_key, "host_key": host_key})

    @_guarded
    async def _get_secret(self, session_id: str) -> tuple[bytes, bytes] | None:
        raw = await self.redis.hgetall(_secret_key(session_id))
        return (raw[b"client_key"], raw[b"host_key"]) if raw else None

    @_guarded
    async def _meta_setdefault(self, name: str, value: str) -> str:
        await self.redis.hsetnx(META, name, value)
        return (await self.redis.hget(META, name)).decode()

    @_guarded
    async def get_profile_choice(self, user: str) -> str | None:
        found = await self.redis.hget(PROFILE_CHOICES, user)
        return found.decode() if found is not None else None

    @_guarded
    async def put_profile_choice(self, user: str, profile: str) -> None:
        await self.redis.hset(PROFILE_CHOICES, user, profile)

    @_guarded
    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()
