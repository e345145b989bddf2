"""The gateway image (etc/gateway/Dockerfile) for tests and benchmarks: built from this checkout
on the local Debian base, only when its sources changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_IMAGE = os.environ.get("TB_GATEWAY_IMAGE", "termbridge/gateway:test")
LOCAL_BASE = "termbridge/test-base:bookworm"
# Where the image expects the host's /etc (see etc/gateway/entrypoint.sh).
HOST_ETC = "/run/host-etc"


def ensure_gateway_image(tag: str = GATEWAY_IMAGE, base: str = LOCAL_BASE) -> str:
    """Build `tag` unless it already carries these sources' digest; return the tag."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "gateway-image.sh"), "--base", base, "--tag", tag, "--if-stale"],
        cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"gateway image build failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return tag
