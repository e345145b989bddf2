"""Prometheus metrics: the only module that imports prometheus_client.

Each gateway has its own registry (never the library's global one), so that several gateways in
one process, as in the tests, count apart. Session and login counts come from the session
manager as a `SessionObserver`; Docker errors from a `MeteredBackend` that wraps the backend, in
the ContainerSSH way: one layer around another behind the same interface.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Awaitable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .auth import AuthenticatedUser
from .backends.base import Backend, Container, ContainerInfo, ContainerSpec, ContainerState, ContainerStats
from .config import DEFAULT_PROFILE
from .errors import BackendUnavailable, BridgeError, ImageMissing, SessionStartError
from .observers import SessionObserver
from .session import Session
from .sessions import SessionManager
from .vocab import READY_END_REASONS, BackendOp, Door, EndReason, LoginResult, StartResult

T = TypeVar("T")

# Backend calls whose error series exist from the start (a claim's failures appear when they happen).
PRESET_OPERATIONS = (BackendOp.PING, BackendOp.START, BackendOp.STOP, BackendOp.POLL, BackendOp.LIST)
# Time to a prompt: container create + start + sshd + shell; seconds.
START_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0)


class _LiveSessions(Collector):
    """Live sessions by door and profile, read from the manager at scrape time, so the gauge
    cannot drift. Profiles are the configured ones (bounded), every one shown from the start."""

    NAME = "termbridge_sessions_live"
    HELP = "Sessions whose container is up and that have not begun to end, by front door and profile."

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["door", "profile"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["door", "profile"])
        live = Tally((s.door, s.profile) for s in self.manager.list() if s.ready_at is not None and not s.ending)
        profiles = [p.name for p in self.manager.config.all_profiles()]
        for key in sorted({(door, profile) for door in Door for profile in profiles} | set(live)):
            family.add_metric(list(key), live[key])
        yield family


class Metrics(SessionObserver):
    """The gateway's metrics and their registry."""

    def __init__(self, profiles: Iterable[str] = (DEFAULT_PROFILE,)) -> None:
        """`profiles`: the configured profile names, a label of the session series (bounded:
        only names from the config are ever used)."""
        profiles = tuple(profiles)
        # No `*_created` twin for every counter: it doubles the series and dashboards use rate().
        # (A process-wide switch of the library; this process exposes only our registries.)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.logins = Counter(
            "termbridge_login_attempts", "Login attempts by front door and result.", ["door", "result"], registry=r
        )
        self.starts = Counter(
            "termbridge_session_starts",
            "Session starts by front door, result (ok, error, cancelled, refused) and profile.",
            ["door", "result", "profile"], registry=r,
        )
        self.ends = Counter(
            "termbridge_session_ends", "Ends of sessions that were ready, by front door, reason and profile.",
            ["door", "reason", "profile"], registry=r,
        )
        self.time_to_prompt = Histogram(
            "termbridge_session_start_seconds",
            "Time from a session request to a ready session (time to prompt), by front door and profile.",
            ["door", "profile"], buckets=START_BUCKETS, registry=r,
        )
        self.bytes = Counter(
            "termbridge_session_bytes", "Terminal bytes of ended sessions, in (from the person) and out.",
            ["door", "direction"], registry=r,
        )
        self.reaped = Counter(
            "termbridge_containers_reaped", "Containers removed because no live session owned them.", registry=r
        )
        self.docker_errors = Counter(
            "termbridge_docker_errors", "Failed Docker operations by operation and kind.", ["operation", "kind"],
            registry=r,
        )
        for door in Door:  # every series exists from the start, at zero: rate() needs no gaps
            for result in LoginResult:
                self.logins.labels(door, result)
            for profile in profiles:
                for result in StartResult:
                    self.starts.labels(door, result, profile)
                for reason in READY_END_REASONS:
                    self.ends.labels(door, reason, profile)
                self.time_to_prompt.labels(door, profile)
            for direction in ("in", "out"):
                self.bytes.labels(door, direction)
        for operation in PRESET_OPERATIONS:
            self.docker_errors.labels(operation, "unavailable")

    def watch(self, manager: SessionManager) -> None:
        self.registry.register(_LiveSessions(manager))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition the scraper's Accept header asks for (Prometheus text by default,
        OpenMetrics on request), and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- SessionObserver ----------------------------------------------------------------------

    def login(self, user: str, rhost: str | None, door: Door, result: LoginResult, reason: str) -> None:
        self.logins.labels(door, result).inc()

    def session_started(self, session: Session, seconds: float) -> None:
        self.starts.labels(session.door, StartResult.OK, session.profile).inc()
        self.time_to_prompt.labels(session.door, session.profile).observe(seconds)

    def session_failed(self, session: Session, detail: str) -> None:
        cancelled = session.end_reason is EndReason.CANCELLED
        self.starts.labels(session.door, StartResult.CANCELLED if cancelled else StartResult.ERROR, session.profile).inc()

    def session_ended(self, session: Session) -> None:
        self.ends.labels(session.door, session.end_reason or EndReason.ERROR, session.profile).inc()
        self.bytes.labels(session.door, "in").inc(session.bytes_in)
        self.bytes.labels(session.door, "out").inc(session.bytes_out)

    def session_refused(self, user: AuthenticatedUser, door: Door, detail: str, profile: str = DEFAULT_PROFILE) -> None:
        self.starts.labels(door, StartResult.REFUSED, profile).inc()

    def containers_reaped(self, count: int) -> None:
        self.reaped.inc(count)


def _error_kind(exc: BridgeError) -> str:
    if isinstance(exc, BackendUnavailable):
        return "unavailable"
    if isinstance(exc, ImageMissing):
        return "image_missing"
    if isinstance(exc, SessionStartError):
        return "start_failed"
    return "other"


class MeteredBackend:
    """A Backend that counts the failures of the Backend it wraps; everything else passes through."""

    def __init__(self, inner: Backend, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def _count(self, operation: BackendOp, call: Awaitable[T]) -> T:
        try:
            return await call
        except BridgeError as exc:
            self.metrics.docker_errors.labels(operation, _error_kind(exc)).inc()
            raise

    async def ping(self) -> str:
        return await self._count(BackendOp.PING, self.inner.ping())

    async def start(self, spec: ContainerSpec) -> Container:
        return await self._count(BackendOp.START, self.inner.start(spec))

    async def claim(self, container: Container, user: str, uid: int, root: bool) -> Container:
        return await self._count(BackendOp.CLAIM, self.inner.claim(container, user, uid, root))

    async def stop(self, container_id: str) -> None:
        await self._count(BackendOp.STOP, self.inner.stop(container_id))

    async def poll(self, container_id: str) -> ContainerState:
        return await self._count(BackendOp.POLL, self.inner.poll(container_id))

    async def stats(self, container_id: str) -> ContainerStats | None:
        return await self._count(BackendOp.STATS, self.inner.stats(container_id))

    async def list_own(self) -> list[ContainerInfo]:
        return await self._count(BackendOp.LIST, self.inner.list_own())

    async def list_fleet(self) -> list[ContainerInfo]:
        return await self._count(BackendOp.LIST, self.inner.list_fleet())

    async def unreachable(self) -> set[str]:
        return await self._count(BackendOp.LIST, self.inner.unreachable())

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
