"""The typed keys under which the composition root hands the web door its components."""

from __future__ import annotations

import weakref
from pathlib import Path

from aiohttp import web

from ..accounts import AccountGuard
from ..backends.base import Backend
from ..config import Config
from ..metrics import Metrics
from ..relay import Relay
from ..sessions import SessionManager
from ..store import Store
from ..throttle import ThrottledAuthenticator

ACCOUNTS = web.AppKey("accounts", AccountGuard)  # re-checks accounts of earlier logins
CONFIG = web.AppKey("config", Config)
MANAGER = web.AppKey("manager", SessionManager)
AUTHENTICATOR = web.AppKey("authenticator", ThrottledAuthenticator)
BACKEND = web.AppKey("backend", Backend)
LOGINS = web.AppKey("logins", "LoginRegistry")  # bridge.web.login.LoginRegistry
METRICS = web.AppKey("metrics", Metrics)
RELAY = web.AppKey("relay", Relay)  # views of sessions other gateways serve (a store that relays only)
STORE = web.AppKey("store", Store)  # sessions, logins, counters shared across restarts and replicas
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)  # live terminal sockets, closed on shutdown
WEB_ROOT = web.AppKey("web_root", Path)
