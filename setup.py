"""Build hook: a wheel must carry xterm.js, which comes from npm (web/package-lock.json), never
from a CDN and never from git. Metadata lives in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

WEB = Path(__file__).resolve().parent / "web"
XTERM = WEB / "node_modules" / "@xterm" / "xterm" / "lib" / "xterm.mjs"


class BuildWithWebAssets(build_py):
    def run(self) -> None:
        if not getattr(self, "editable_mode", False) and not XTERM.exists():
            npm = shutil.which("npm")
            if npm is None:
                raise SystemExit(
                    f"termbridge: {XTERM.relative_to(WEB.parent)} is missing and npm is not installed; "
                    "run `npm ci` in web/ (or `make assets`) before building"
                )
            subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithWebAssets})
