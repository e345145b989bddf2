"""The session image and the engine as the command line sees them: `termbridge image build` and
the facts `termbridge check` reports. Blocking calls are fine here (no event loop); like the
backend, this is one of the two modules that import the docker SDK."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import docker
import docker.errors
import requests.exceptions

from .. import resources
from ..errors import BackendUnavailable, SessionStartError

SESSION_IMAGE_DIR = resources.session_image_dir()


CONTEXT_LABEL = "termbridge.context"  # what the image was built from: see context_digest
STEP_RE = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
LINE_WIDTH = 80  # a progress line fits an 80-column terminal


class BuildProgress:
    """Turns the engine's build stream into one line per step (`[3/12] 0:42 RUN apt-get ...`,
    the time since the build began) and keeps the full log for --verbose or a failure."""

    def __init__(self, out: TextIO, verbose: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.verbose, self.clock = out, verbose, clock
        self.started = clock()
        self.log: list[str] = []
        self._partial = ""

    def elapsed(self) -> str:
        seconds = int(self.clock() - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def feed(self, text: str) -> None:
        """One `stream` piece of the build (it may end mid-line)."""
        if self.verbose:
            self.out.write(text)
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self.log.append(line)
            step = STEP_RE.match(line.strip())
            if step and not self.verbose:
                text = f"[{step.group(1)}/{step.group(2)}] {self.elapsed()} {' '.join(step.group(3).split())}"
                print(text if len(text) <= LINE_WIDTH else text[: LINE_WIDTH - 3] + "...", file=self.out)
        self.out.flush()

    def failed(self, error: str) -> None:
        """The build failed: the whole log (unless it was shown already), then why."""
        if not self.verbose:
            self.out.write("".join(line + "\n" for line in [*self.log, self._partial] if line))
        print(f"build failed after {self.elapsed()}: {error.strip()}", file=self.out)


def context_digest(context: Path, base: str | None) -> str:
    """A digest of the build context's files and the base: an image labelled with the same digest
    was built from exactly this, so `--if-stale` may skip the build."""
    digest = hashlib.sha256(f"base={base or ''}\n".encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(context).as_posix()}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _built_from(api: docker.APIClient, tag: str) -> str | None:
    try:
        return (api.inspect_image(tag)["Config"].get("Labels") or {}).get(CONTEXT_LABEL)
    except docker.errors.ImageNotFound:
        return None


def build_image(
    tag: str, base: str | None = None, context: Path = SESSION_IMAGE_DIR, verbose: bool = False,
    out: TextIO = sys.stderr, if_stale: bool = False,
) -> int:
    """Build the session image (a command-line action, so blocking is fine here): one progress
    line per step, the full build log with `verbose` or when the build fails. With `if_stale`,
    an image already built from this context and base is kept. Returns 0 on success, 1 on a
    failed build."""
    if not (context / "Dockerfile").is_file():
        raise SessionStartError(f"no Dockerfile in {context}")
    try:
        api = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
    except docker.errors.DockerException as exc:
        raise BackendUnavailable(detail=f"Docker engine unreachable: {exc}") from exc
    digest = context_digest(context, base)
    if if_stale and _built_from(api, tag) == digest:
        print(f"{tag} is up to date (built from this session-image/ and base)", file=out)
        return 0
    buildargs = {"BASE_IMAGE": base} if base else {}
    print(f"building {tag} from {context}" + (f" on {base}" if base else ""), file=out)
    progress = BuildProgress(out, verbose)
    for chunk in api.build(
        path=str(context), tag=tag, buildargs=buildargs, labels={CONTEXT_LABEL: digest}, rm=True, forcerm=True,
        decode=True,
    ):
        if "stream" in chunk:
            progress.feed(chunk["stream"])
        elif "error" in chunk:
            progress.failed(chunk["error"])
            return 1
    print(f"built {tag} in {progress.elapsed()}", file=out)
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
    swarm_manager: bool = False  # this engine can place Swarm services (session.backend = swarm)
    swarm_nodes: tuple[int, int] = (0, 0)  # nodes ready, nodes known (as a manager sees them)


def _swarm_nodes(api: docker.APIClient) -> tuple[int, int]:
    nodes = api.nodes()
    return sum(1 for n in nodes if (n.get("Status") or {}).get("State") == "ready"), len(nodes)


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
            swarm_manager=bool((info.get("Swarm") or {}).get("ControlAvailable")),
            swarm_nodes=_swarm_nodes(api) if (info.get("Swarm") or {}).get("ControlAvailable") else (0, 0),
        )
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise BackendUnavailable(detail=f"Docker engine unreachable: {exc}") from exc
    finally:
        api.close()
