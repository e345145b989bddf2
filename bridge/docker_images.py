"""The session image and the engine as the command line sees them: `termbridge image build` and
the facts `termbridge check` reports. Blocking calls are fine here (no event loop); like the
backend, this is one of the two modules that import the docker SDK."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests.exceptions

from . import resources
from .errors import BackendUnavailable, SessionStartError

SESSION_IMAGE_DIR = resources.session_image_dir()


def build_image(tag: str, base: str | None = None, context: Path = SESSION_IMAGE_DIR) -> int:
    """Build the session image (a command-line action, so blocking is fine here). Streams the
    build log to stderr; returns 0 on success, 1 on a failed build."""
    if not (context / "Dockerfile").is_file():
        raise SessionStartError(f"no Dockerfile in {context}")
    try:
        api = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
    except docker.errors.DockerException as exc:
        raise BackendUnavailable(detail=f"Docker engine unreachable: {exc}") from exc
    buildargs = {"BASE_IMAGE": base} if base else {}
    print(f"building {tag} from {context}" + (f" on {base}" if base else ""), file=sys.stderr)
    for chunk in api.build(path=str(context), tag=tag, buildargs=buildargs, rm=True, forcerm=True, decode=True):
        if "stream" in chunk:
            sys.stderr.write(chunk["stream"])
        elif "error" in chunk:
            print(f"build failed: {chunk['error']}", file=sys.stderr)
            return 1
    print(f"built {tag}", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class EngineFacts:
    """What `termbridge check` reports about the Docker engine."""

    host: str
    version: str
    api_version: str
    security_options: tuple[str, ...]
    image_id: str | None  # None: the image is not present
    image_created: str | None


def engine_facts(image: str) -> EngineFacts:
    """Ask the engine about itself and the session image (a command-line action: blocking is
    fine). Raises BackendUnavailable when the engine cannot be reached."""
    try:
        api = docker.APIClient(version="auto", timeout=15, **docker.utils.kwargs_from_env())
    except docker.errors.DockerException as exc:
        raise BackendUnavailable(detail=f"Docker engine unreachable: {exc}") from exc
    try:
        version = api.version()
        info = api.info()
        try:
            inspected = api.inspect_image(image)
        except docker.errors.ImageNotFound:
            inspected = None
        return EngineFacts(
            host=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
            version=str(version.get("Version", "unknown")),
            api_version=str(version.get("ApiVersion", "unknown")),
            security_options=tuple(info.get("SecurityOptions") or ()),
            image_id=inspected["Id"] if inspected else None,
            image_created=inspected.get("Created") if inspected else None,
        )
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise BackendUnavailable(detail=f"Docker engine unreachable: {exc}") from exc
    finally:
        api.close()
