"""Build hook: a wheel must carry xterm.js and asciinema-player, which come from npm
(web/package-lock.json), never from a CDN and never from git. Metadata lives in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

WEB = Path(__file__).resolve().parent / "web"
XTERM = WEB / "node_modules" / "@xterm" / "xterm" / "lib" / "xterm.mjs"
PLAYER = WEB / "node_modules" / "asciinema-player" / "dist" / "bundle" / "asciinema-player.min.js"


class BuildWithWebAssets(build_py):
    def run(self) -> None:
        missing = [path for path in (XTERM, PLAYER) if not path.exists()]
        if not getattr(self, "editable_mode", False) and missing:
            npm = shutil.which("npm")
            if npm is None:
                raise SystemExit(
                    f"termbridge: {missing[0].relative_to(WEB.parent)} is missing and npm is not installed; "
                    "run `npm ci` in web/ (or `make assets`) before building"
                )
            subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithWebAssets})
