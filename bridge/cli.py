"""The `termbridge` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__, logsafe
from .config import Config, load_config
from .errors import BridgeError, ConfigError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="termbridge", description="A shell in a brand-new container, from a browser.")
    parser.add_argument("--version", action="version", version=f"termbridge {__version__}")
    config_help = "TOML configuration (default /etc/termbridge/termbridge.toml)"
    parser.add_argument("--config", metavar="FILE", help=config_help)
    # Also accepted after the subcommand; SUPPRESS keeps a --config given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the gateway in the foreground")
    check = sub.add_parser("check", parents=[common], help="preflight: one line per check, exit 1 on any failure")
    check.add_argument("--pre-start", action="store_true",
                       help="before a start (systemd ExecStartPre): Docker being down is a warning, not a failure")
    image = sub.add_parser("image", parents=[common], help="manage the session image")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", parents=[common], help="build the session image from session-image/")
    build.add_argument("--base", metavar="IMAGE", help="base image (default ubuntu:24.04)")
    build.add_argument("--verbose", action="store_true", help="the full build log, not one line per step")
    build.add_argument("--if-stale", action="store_true", help="keep an image already built from this context and base")
    sessions = sub.add_parser("sessions", parents=[common], help="live sessions of every gateway sharing the store")
    sessions_sub = sessions.add_subparsers(dest="sessions_command", required=True)
    listing = sessions_sub.add_parser(
        "list", parents=[common], help="id, user, door, profile, container, started, idle for, gateway"
    )
    listing.add_argument("--json", action="store_true", help="one JSON array of objects, for scripts")
    kill = sessions_sub.add_parser("kill", parents=[common], help="end sessions (the person sees why)")
    target = kill.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", help="session id (a unique prefix will do)")
    target.add_argument("--user", metavar="NAME", help="every session of this user, on every gateway")
    target.add_argument("--all", action="store_true", help="every session of every gateway")
    homes = sub.add_parser("homes", parents=[common], help="persistent home directories on this host")
    homes_sub = homes.add_subparsers(dest="homes_command", required=True)
    homes_sub.add_parser("list", parents=[common], help="every home: user, uid, size limit, used")
    du = homes_sub.add_parser("du", parents=[common], help="how much of their home one person (or everyone) uses")
    du.add_argument("user", nargs="?", help="login name (or the uid of a deleted account)")
    rm = homes_sub.add_parser("rm", parents=[common], help="delete one person's home (refused while they have a session)")
    rm.add_argument("user", help="login name (or the uid of a deleted account)")
    return parser


def _ask_gateway(config: Config, payload: dict[str, object]) -> dict | None:
    """One admin-socket request; None (after saying why on stderr) when it failed."""
    from .admin import request, socket_path

    path = socket_path(config.state_dir)
    try:
        answer = request(path, payload, timeout=600 if payload.get("command") == "homes" else 15)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"termbridge: the gateway is not running (no admin socket at {path})", file=sys.stderr)
        return None
    except PermissionError:
        print(f"termbridge: permission denied on {path} (run as root)", file=sys.stderr)
        return None
    if "error" in answer:
        print(f"termbridge: {answer['error']}", file=sys.stderr)
        return None
    return answer


def _print_table(rows: list[tuple[str, ...]]) -> None:
    from .fleet import format_table

    for line in format_table(rows):
        print(line)


def homes_command(config: Config, args: argparse.Namespace) -> int:
    from .homefiles import human_size

    action = args.homes_command
    payload: dict[str, object] = {"command": "homes", "action": action}
    if getattr(args, "user", None):
        payload["user"] = args.user
    answer = _ask_gateway(config, payload)
    if answer is None:
        return 1
    if action == "rm":
        print(f"removed the home of {args.user} (uid {answer['removed']})")
        return 0
    rows = [("USER", "UID", "SIZE", "USED", "USE%", "MOUNTED")]
    for home in answer["homes"]:
        rows.append((
            home["user"] or "-", str(home["uid"]), human_size(home["size"]), human_size(home["used"]),
            f"{100 * home['used'] // max(1, home['size'])}%", "yes" if home["mounted"] else "no",
        ))
    _print_table(rows)
    return 0


def sessions_command(config: Config, args: argparse.Namespace) -> int:
    if args.sessions_command == "list":
        payload: dict[str, object] = {"command": "list"}
    elif args.all:
        payload = {"command": "kill", "all": True}
    elif args.user is not None:
        payload = {"command": "kill", "user": args.user}
    else:
        payload = {"command": "kill", "id": args.id}
    answer = _ask_gateway(config, payload)
    if answer is None:
        return 1
    if args.sessions_command == "kill":
        for session_id in answer["killed"]:
            print(f"killed {session_id}")
        if args.user is not None:
            count = len(answer["killed"])
            print(f"{count} session{'s' if count != 1 else ''} of {args.user} ended")
        return 0
    if args.json:
        json.dump(answer["sessions"], sys.stdout, indent=1)
        print()
        return 0
    from .fleet import format_sessions

    for line in format_sessions(answer["sessions"]):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logsafe.configure(logging.INFO, sys.stderr)
    if args.command == "check":
        from .check import main as check

        return check(args.config, pre_start=args.pre_start)  # a bad config is one of its findings, not exit 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"termbridge: configuration error: {exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    logsafe.configure(getattr(logging, config.log.level.upper()), sys.stderr, config.log.format)
    try:
        if args.command == "serve":
            from .app import serve

            serve(config, lambda: load_config(args.config))
            return 0
        if args.command == "image":
            from .backends.images import build_image

            return build_image(config.session.image, base=args.base, verbose=args.verbose, if_stale=args.if_stale)
        if args.command == "sessions":
            return sessions_command(config, args)
        if args.command == "homes":
            return homes_command(config, args)
    except ConfigError as exc:
        print(f"termbridge: configuration error: {exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    except BridgeError as exc:
        print(f"termbridge: {exc.user_message} ({exc.detail})", file=sys.stderr)
        return 1
    return 1
