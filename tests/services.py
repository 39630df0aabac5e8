"""Real Redis and NATS servers for tests, on loopback ports of their own, stopped afterwards
(installed by scripts/services.sh)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(500):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise RuntimeError(f"{what} did not listen on {port}")


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        password: str | None = None,
        port: int | None = None,
        tls_cert: tuple[Path, Path] | None = None,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is missing: run scripts/services.sh")
        self.port = port or free_port()
        self.password = password
        self.workdir = workdir
        self.tls_cert = tls_cert
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--daemonize", "no"]
        if self.tls_cert:
            cert, key = self.tls_cert
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "redis-server")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls_cert else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        cmd = ["redis-cli", "-p", str(self.port)]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, check=True).stdout

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class NatsServer:
    def __init__(self, token: str | None = None, user: tuple[str, str] | None = None) -> None:
        if shutil.which("nats-server") is None:
            raise RuntimeError("nats-server is missing: run scripts/services.sh")
        self.port = free_port()
        auth = ["--auth", token] if token else []
        auth += ["--user", user[0], "--pass", user[1]] if user else []
        self.proc = subprocess.Popen(
            ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), *auth],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self.proc, "nats-server")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
