"""`termbridge image build` progress: one line per step, the full log on --verbose or a failure.
Through the real engine (the session image under a private tag, a throwaway failing context)
and on a recorded build stream with a clock this test turns."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid

import docker
import pytest

from bridge.backends.images import BuildProgress, build_image
from helpers import ROOT

BASE = "termbridge/test-base:bookworm"
STEP_LINE = re.compile(r"^\[(\d+)/(\d+)\] \d+:\d\d (.+)$")

RECORDED = [
    "Step 1/3 : FROM termbridge/test-base:bookworm\n", " ---> 0123456789ab\n",
    "Step 2/3 : RUN apt-get update && apt-get install -y --no-install-recommends openssh-server ca-certificates "
    "less nano vim-tiny\n", " ---> Running in 5a5a\n", "Get:1 http://deb.example bookworm InRelease\n",
    "Step 3/3 : COPY entry", "point.sh /usr/local/sbin/\n", " ---> 9a9a\n",
]


@pytest.fixture
def private_tag(docker_engine):
    tag = f"termbridge/session:conv-test-{uuid.uuid4().hex[:8]}"
    yield tag
    try:
        docker_engine.images.remove(tag)
    except docker.errors.ImageNotFound:
        pass


def test_the_session_image_builds_with_one_line_per_step(private_tag, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "image", "build", "--base", BASE, "--config", str(ROOT / "etc" / "termbridge.toml")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "TERMBRIDGE_SESSION_IMAGE": private_tag,
             "TERMBRIDGE_STATE_DIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    steps = [STEP_LINE.match(line) for line in lines[1:-1]]
    assert all(steps), lines  # nothing but step lines between the first and the last
    total = int(steps[0].group(2))  # type: ignore[union-attr]
    assert [int(m.group(1)) for m in steps] == list(range(1, total + 1))  # type: ignore[union-attr]
    # every Dockerfile instruction, and the engine's own LABEL step for the context digest
    assert total == 1 + sum(1 for line in (ROOT / "session-image" / "Dockerfile").read_text().splitlines()
                            if re.match(r"^[A-Z]+ ", line))
    assert all(len(line) <= 80 for line in lines[1:-1])
    assert lines[-1].startswith(f"built {private_tag} in ")
    assert "--->" not in proc.stderr  # the engine's own chatter stays out


def test_a_failed_build_shows_its_whole_log(tmp_path):
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo the-build-says-hello && exit 3\n")
    out = io.StringIO()
    assert build_image(f"termbridge/conv-fail:{uuid.uuid4().hex[:8]}", context=tmp_path, out=out) == 1
    text = out.getvalue()
    assert "[2/3] 0:0" in text and "the-build-says-hello" in text and "Step 2/3 : RUN" in text
    assert re.search(r"build failed after \d+:\d\d: .*returned a non-zero code: 3", text), text


def test_progress_of_a_recorded_stream():
    now = [100.0]
    out = io.StringIO()
    progress = BuildProgress(out, clock=lambda: now[0])
    for piece, at in zip(RECORDED, (100, 100, 103, 103, 150, 172, 172, 173)):
        now[0] = at
        progress.feed(piece)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/3] 0:00 FROM termbridge/test-base:bookworm"
    assert lines[1].startswith("[2/3] 0:03 RUN apt-get update && apt-get install") and lines[1].endswith("...")
    assert len(lines[1]) <= 80
    assert lines[2] == "[3/3] 1:12 COPY entrypoint.sh /usr/local/sbin/"  # a step line split across two pieces
    assert len(lines) == 3
    progress.failed("boom\n")
    tail = out.getvalue().splitlines()[3:]
    assert tail[: len(RECORDED) - 1] == "".join(RECORDED).splitlines()
    assert tail[-1] == "build failed after 1:13: boom"


def test_verbose_shows_the_engine_log_as_it_comes():
    out = io.StringIO()
    progress = BuildProgress(out, verbose=True)
    for piece in RECORDED:
        progress.feed(piece)
    assert out.getvalue() == "".join(RECORDED)


def test_if_stale_keeps_an_image_built_from_the_same_context(tmp_path):
    """`make test` builds the session image with --if-stale: an image labelled with this context's
    digest is kept; a changed context is built again."""
    from bridge.backends.images import CONTEXT_LABEL, context_digest

    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("ARG BASE_IMAGE=scratch\nFROM ${BASE_IMAGE}\nLABEL probe=1\n")
    tag = f"termbridge/test-stale:{os.getpid()}"
    base = "termbridge/test-base:bookworm"
    client = docker.from_env()
    try:
        out = io.StringIO()
        assert build_image(tag, base=base, context=context, out=out) == 0
        first = client.images.get(tag)
        assert first.labels[CONTEXT_LABEL] == context_digest(context, base)
        out = io.StringIO()
        assert build_image(tag, base=base, context=context, out=out, if_stale=True) == 0
        assert "up to date" in out.getvalue() and "building" not in out.getvalue()
        (context / "extra").write_text("changed\n")
        out = io.StringIO()
        assert build_image(tag, base=base, context=context, out=out, if_stale=True) == 0
        assert "building" in out.getvalue()
        assert client.images.get(tag).labels[CONTEXT_LABEL] == context_digest(context, base) != first.labels[CONTEXT_LABEL]
    finally:
        client.images.remove(tag, force=True)
