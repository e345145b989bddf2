"""Where gateways keep what must outlive one process: sessions, slots, logins, throttle counters
and reconnect secrets. `store.url` picks the backend: empty for SQLite in state_dir (one host),
`redis://HOST:PORT/DB` for several gateways. sqlite3 and redis are imported only in this package."""

from __future__ import annotations

from ..config import Config
from .base import LoginRecord, Refusal, SecretBox, SessionRecord, SessionSecret, Slot, Store

__all__ = ["LoginRecord", "Refusal", "SessionRecord", "SessionSecret", "Slot", "Store", "open_store", "probe"]


async def probe(config: Config) -> str:
    """Where the configured store is, once it answers (raises StoreUnavailable); writes nothing."""
    if config.store.url:
        from .redis import probe as probe_redis
        from .redis import where

        await probe_redis(config.store.url)
        return f"redis at {where(config.store.url)} answers"
    return f"SQLite at {config.state_dir / 'state.db'} (one host)"


async def open_store(config: Config) -> Store:
    """The configured store, connected and checked (raises StoreUnavailable or ConfigError).

    state_dir must exist (the gateway creates it 0700 first)."""
    box = SecretBox.from_file(config.store_secret_file)
    if config.store.url:
        from .redis import RedisStore

        return await RedisStore.open(config.store.url, box)
    from .sqlite import SqliteStore

    return await SqliteStore.open(config.state_dir / "state.db", box)
