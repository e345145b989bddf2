"""The gateway image through the real things: built by scripts/gateway-image.sh from this
checkout, it runs `termbridge`, and PAM inside it authenticates host accounts through the host's
/etc mounted read-only, read live (an account added or removed after the container started is
seen at once)."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest

from testbed.accounts import HostUser
from testbed.gateway_image import HOST_ETC, ensure_gateway_image

LABEL = "termbridge.test=gateway-image"
# PAM through the image's service file (etc/pam.d/termbridge), as the gateway calls it.
PAM_CHECK = (
    "import pam, sys; p = pam.pam(); "
    "print(p.authenticate(sys.argv[1], sys.argv[2], service='termbridge'))"
)


@pytest.fixture(scope="module")
def image() -> str:
    return ensure_gateway_image()


@pytest.fixture
def container(image: str) -> Iterator[Callable[..., str]]:
    """Start idle gateway containers (entrypoint as in production, then a sleep), removed after."""
    made: list[str] = []

    def start(*mounts: str, env: tuple[str, ...] = ()) -> str:
        name = f"tb-gwimage-{secrets.token_hex(4)}"
        volumes = [arg for mount in mounts for arg in ("-v", mount)]
        variables = [arg for var in env for arg in ("-e", var)]
        subprocess.run(
            ["docker", "run", "-d", "--name", name, "--label", LABEL, *volumes, *variables,
             "--entrypoint", "sh", image, "-c", "/usr/local/sbin/termbridge-gateway --version && exec sleep 300"],
            check=True, capture_output=True, text=True,
        )
        made.append(name)
        return name

    yield start
    for name in made:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def pam_login(container: str, user: str, password: str) -> bool:
    done = subprocess.run(
        ["docker", "exec", container, "/opt/termbridge/bin/python", "-c", PAM_CHECK, user, password],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def test_the_image_runs_the_checkouts_termbridge(image: str) -> None:
    done = subprocess.run(["docker", "run", "--rm", image, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("termbridge ")


def test_pam_reads_the_mounted_host_accounts_live(
    container: Callable[..., str], make_user: Callable[..., HostUser]
) -> None:
    gateway = container(f"/etc:{HOST_ETC}:ro")
    # Made after the container started: useradd/chpasswd replace /etc/passwd and /etc/shadow.
    user = make_user()
    assert pam_login(gateway, user.name, user.password)
    assert not pam_login(gateway, user.name, user.password + "x")
    locked = make_user(locked=True)
    assert not pam_login(gateway, locked.name, locked.password)
    subprocess.run(["userdel", "-f", user.name], check=True, capture_output=True)
    assert not pam_login(gateway, user.name, user.password)


@pytest.mark.parametrize("mounted", [False, True], ids=["no-mount", "GATEWAY_ACCOUNTS=image"])
def test_without_the_mount_or_when_asked_only_the_images_own_accounts(
    container: Callable[..., str], make_user: Callable[..., HostUser], mounted: bool
) -> None:
    """The directory-service path (etc/swarm/sssd.yml) starts from the image's own files."""
    user = make_user()
    gateway = container(f"/etc:{HOST_ETC}:ro", env=("GATEWAY_ACCOUNTS=image",)) if mounted else container()
    assert not pam_login(gateway, user.name, user.password)
    done = subprocess.run(["docker", "exec", gateway, "getent", "passwd", "root"], capture_output=True, text=True)
    assert done.stdout.startswith("root:")
