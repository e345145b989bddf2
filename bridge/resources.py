"""Where the files that travel with the code are: web assets, the session image's build context,
the deploy kit (sample config, PAM service, systemd unit, nginx site).

An installed wheel carries them inside the package (`bridge/_web`, `bridge/_session_image`,
`bridge/_etc`; see pyproject.toml); a source checkout has them beside the package (`web/`,
`session-image/`, `etc/`). The installed copy wins when both exist.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
CHECKOUT_ROOT = PACKAGE_ROOT.parent


def _pick(installed: str, checkout: str, marker: str) -> Path:
    inside = PACKAGE_ROOT / installed
    if (inside / marker).exists():
        return inside
    return CHECKOUT_ROOT / checkout


def web_root() -> Path:
    """Templates, static files and `node_modules/@xterm/*`."""
    return _pick("_web", "web", "templates/login.html")


def session_image_dir() -> Path:
    """The build context of `termbridge image build`."""
    return _pick("_session_image", "session-image", "Dockerfile")


def etc_dir() -> Path:
    """The deploy kit: termbridge.toml, pam.d/, systemd/, nginx/."""
    return _pick("_etc", "etc", "termbridge.toml")
