"""A throw-away PostgreSQL server on loopback for tests (Debian's `postgresql` package; .ci/run installs it).

initdb refuses to run as root, so as root the cluster is created and started as the `postgres` user.
Absent binaries skip the test locally but fail it in CI (CI=true), where it must run.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def pg_bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    def __init__(self):
        bindir = pg_bin_dir()
        if bindir is None:
            msg = "PostgreSQL binaries (pg_ctl, initdb) not found; apt-get install -y postgresql"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(msg + " (CI must run this test)")
            pytest.skip(msg)
        # pytest's tmp dirs are private to root (0700); the server user must reach its cluster
        self.top = Path(tempfile.mkdtemp(prefix="refusal-atlas-pg-"))
        self.top.chmod(0o755)
        root = self.top / "cluster"
        root.mkdir()
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        self.bindir, self.root, self.port = bindir, root, _free_port()
        self.data = root / "data"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run(_as_server_user([str(self.bindir / tool), *args]), capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.1)
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    yield server
    server.stop()
