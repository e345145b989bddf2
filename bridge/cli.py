"""The `termbridge` command."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config
from .errors import BridgeError, ConfigError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="termbridge", description="A shell in a brand-new container, from a browser.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML configuration (default /etc/termbridge/termbridge.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the gateway in the foreground")
    sub.add_parser("check", parents=[common], help="preflight: one line per check, exit 1 on any failure")
    image = sub.add_parser("image", parents=[common], help="manage the session image")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", parents=[common], help="build the session image from session-image/")
    build.add_argument("--base", metavar="IMAGE", help="base image (default ubuntu:24.04)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    if args.command == "check":
        from .check import main as check

        return check(args.config)  # a bad config is one of its findings, not exit 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"termbridge: configuration error: {exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "serve":
            from .app import serve

            serve(config)
            return 0
        if args.command == "image":
            from .docker_backend import build_image

            return build_image(config.session.image, base=args.base)
    except ConfigError as exc:
        print(f"termbridge: configuration error: {exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    except BridgeError as exc:
        print(f"termbridge: {exc.user_message} ({exc.detail})", file=sys.stderr)
        return 1
    return 1
