"""ttyd, the comparison: built from Debian's source package (ttyd is not in Debian 12), then run
as `ttyd -W docker run -it --rm ...` on a loopback port.

The source comes from the same Debian mirror this machine's apt already uses (read from its
sources at run time), with a newer suite's deb-src entry in a private apt state directory: the
system's apt configuration is not touched. Build dependencies are bookworm's own packages.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("TB_BENCH_CACHE", Path.home() / ".cache" / "termbridge-bench"))
BINARY = CACHE / "ttyd" / "ttyd"
BUILD_DEPS = ("cmake", "gcc", "make", "pkg-config", "libwebsockets-dev", "libjson-c-dev", "libuv1-dev", "zlib1g-dev", "libssl-dev")
SUITES = ("trixie", "sid")  # newer suites than bookworm, tried in order
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def find() -> Path | None:
    """A ttyd already here: one on PATH, or the one this benchmark built before."""
    on_path = shutil.which("ttyd")
    if on_path:
        return Path(on_path)
    return BINARY if os.access(BINARY, os.X_OK) else None


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The URI of the configured Debian archive (the entry serving the release's main suite,
    not -security), from deb822 `.sources` files or one-line `.list` files."""
    files = [sources_dir / "sources.list"] if (sources_dir / "sources.list").exists() else []
    files += sorted((sources_dir / "sources.list.d").glob("*.sources"))
    files += sorted((sources_dir / "sources.list.d").glob("*.list"))
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (m.group(1).lower(), m.group(2).strip())
                    for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M)
                )
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "").split() and any(_main_suite(s) for s in suites):
                    return fields["uris"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                line = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(line) >= 3 and line[0] == "deb" and _main_suite(line[2]):
                    return line[1].rstrip("/")
    raise RuntimeError(f"no Debian archive entry in {sources_dir}/sources.list(.d)")


def _main_suite(suite: str) -> bool:
    """`bookworm`, `bookworm-updates`, `stable`; not `bookworm-security` or `-backports`."""
    return bool(re.fullmatch(r"[a-z]+(-updates)?", suite))


def _run(cmd: list[str], cwd: Path | None = None, log: list[str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if log is not None:
        log.append(f"$ {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


def build(say=print) -> Path:
    """Build ttyd from Debian's source package into the cache; returns the binary's path.
    Raises RuntimeError saying why when it cannot."""
    log: list[str] = []
    say("ttyd: installing build dependencies from bookworm")
    if _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *BUILD_DEPS], log=log).returncode:
        _run(["apt-get", "update", "-q"], log=log)
        if _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *BUILD_DEPS], log=log).returncode:
            raise RuntimeError("cannot install ttyd's build dependencies:\n" + log[-1])
    mirror = debian_mirror()
    work = Path(tempfile.mkdtemp(prefix="tb-ttyd-"))
    try:
        source = _fetch_source(mirror, work, say, log)
        say(f"ttyd: building {source.name}")
        build_dir = source / "build"
        build_dir.mkdir()
        for cmd in (["cmake", "..", "-DCMAKE_BUILD_TYPE=Release"], ["make", f"-j{os.cpu_count() or 2}"]):
            if _run(cmd, cwd=build_dir, log=log).returncode:
                raise RuntimeError("ttyd build failed:\n" + log[-1])
        BINARY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "ttyd", BINARY)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"ttyd: built {BINARY}")
    return BINARY


def _fetch_source(mirror: str, work: Path, say, log: list[str]) -> Path:
    """`apt-get source ttyd` from the first newer suite that has it. Where the mirror's pool lacks
    the .dsc, the upstream (orig) tarball alone is used, verified against the signed index."""
    state = work / "apt"
    (state / "lists" / "partial").mkdir(parents=True)
    (state / "parts").mkdir()
    listing = state / "sources.list"
    listing.write_text("".join(f"deb-src [signed-by={KEYRING}] {mirror} {suite} main\n" for suite in SUITES))
    apt = [
        f"-oDir::Etc::SourceList={listing}", f"-oDir::Etc::SourceParts={state / 'parts'}",
        f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state / 'cache'}",
    ]
    say(f"ttyd: fetching the source index of {', '.join(SUITES)}")
    if _run(["apt-get", *apt, "update", "-q"], log=log).returncode:
        raise RuntimeError("apt-get update of the deb-src index failed:\n" + log[-1])
    src = work / "src"
    src.mkdir()
    if _run(["apt-get", *apt, "source", "-q", "ttyd"], cwd=src, log=log).returncode == 0:
        unpacked = [p for p in src.iterdir() if p.is_dir() and p.name.startswith("ttyd-")]
        if unpacked:
            return unpacked[0]
    say("ttyd: the full source package is not on this mirror; using its verified orig tarball")
    uris = _run(["apt-get", *apt, "source", "--print-uris", "-q", "ttyd"], cwd=work, log=log).stdout
    for uri, name, _size, digest in re.findall(r"^'([^']+)' (\S+) (\d+) (\S+)$", uris, re.M):
        if ".orig.tar." in name:
            if _run(["/usr/lib/apt/apt-helper", "download-file", uri, str(src / name), digest], log=log).returncode:
                raise RuntimeError(f"cannot download {name}:\n" + log[-1])
            if _run(["tar", "-xf", name], cwd=src, log=log).returncode:
                raise RuntimeError(f"cannot unpack {name}:\n" + log[-1])
            unpacked = [p for p in src.iterdir() if p.is_dir() and p.name.startswith("ttyd")]
            if unpacked:
                return unpacked[0]
    raise RuntimeError("no ttyd source in " + ", ".join(SUITES) + ":\n" + "\n".join(log[-2:]))


def version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    return (out.stdout or out.stderr).strip()


class TtydServer:
    """`ttyd -W` on a loopback port, each connection running `command` (a `docker run -it --rm`)."""

    def __init__(self, binary: Path, command: list[str], log_path: Path) -> None:
        self.binary = binary
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> TtydServer:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "-W", "-i", "127.0.0.1", "-p", str(port), *self.command],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ttyd exited with {self.proc.returncode}: {self.log_path.read_text()[-1000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("ttyd did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
