"""A server under test: spawned as `python -m rt_server serve` on a free loopback port, or one already running;
its CPU time and resident memory read from /proc (Linux), and its /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Final
from urllib.parse import urlsplit, urlunsplit

_CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def http_base(ws_url: str) -> str:
    """http(s)://host:port of a ws(s):// stream URL."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def fetch(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """GET `url` (blocking): status and body; connection failures raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of the process, all threads (from /proc/PID/stat), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces; fields resume after it
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S  # utime, stime (fields 14 and 15)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of the process (from /proc/PID/statm), or None off Linux."""
    try:
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    return int(statm[1]) * _PAGE_BYTES


@dataclass
class ProcSampler:
    """Samples a process's resident memory every `interval_s` while a run goes on; CPU time from its ends."""

    pid: int | None
    interval_s: float = 0.25
    cpu_start_s: float | None = None
    rss_max_bytes: int | None = None

    def start(self) -> None:
        self.cpu_start_s = None if self.pid is None else cpu_seconds(self.pid)
        self.rss_max_bytes = None
        self._sample()

    def _sample(self) -> None:
        rss = None if self.pid is None else rss_bytes(self.pid)
        if rss is not None:
            self.rss_max_bytes = max(rss, self.rss_max_bytes or 0)

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            self._sample()
            await asyncio.sleep(self.interval_s)

    def cpu_used_s(self) -> float | None:
        self._sample()
        if self.pid is None or self.cpu_start_s is None:
            return None
        end = cpu_seconds(self.pid)
        return None if end is None else end - self.cpu_start_s


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class SpawnedServer:
    """`python -m rt_server serve --host 127.0.0.1 --port P ARGS…`, ready once /readyz answers 200.

    Its log goes to a temporary file, shown when it fails to start. Stopped with SIGTERM (a graceful drain),
    then SIGKILL after `stop_timeout_s`.
    """

    def __init__(self, name: str, args: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = tuple(args)
        self.env = env
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, startup_timeout_s: float = 600.0) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "rt_server", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop(): it outlives this method)
        self.process = subprocess.Popen(
            [*command, *self.args], stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status, _ = fetch(f"http://127.0.0.1:{self.port}/readyz", timeout_s=2.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server {self.name} not ready after {startup_timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, max_bytes: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - max_bytes))
        return self._log.read().decode(errors="replace")

    def stop(self, stop_timeout_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SpawnedServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
