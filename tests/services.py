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
        extra: tuple[str, ...] = (),
        tls_ca: Path | None = None,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is missing: run scripts/services.sh")
        self.port = port or free_port()
        self.password = password
        self.workdir = workdir
        self.tls_cert = tls_cert
        self.extra = extra
        self.tls_ca = tls_ca
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--daemonize", "no"]
        if self.tls_cert:
            cert, key = self.tls_cert
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
            if self.tls_ca:
                args += ["--tls-ca-cert-file", str(self.tls_ca)]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "redis-server")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls_cert else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        cmd = ["redis-cli", "-p", str(self.port)]
        if self.tls_ca:
            cmd += ["--tls", "--cacert", str(self.tls_ca)]
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


def make_tls_cert(workdir: Path) -> tuple[Path, Path, Path]:
    """A private CA, and a server certificate for 127.0.0.1 signed by it: (CA, cert, key)."""
    ca, ca_key = workdir / "ca.pem", workdir / "ca.key"
    cert, key, csr = workdir / "server.pem", workdir / "server.key", workdir / "server.csr"
    ext = workdir / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(ca_key),
         "-out", str(ca), "-subj", "/CN=test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "1", "-out", str(cert), "-extfile", str(ext)],
    ):  # fmt: skip
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)
    return ca, cert, key


class RedisCluster:
    """A Redis Cluster on loopback made by `redis-cli --cluster create`: `masters` primaries with
    `replicas` replicas each. A node that stops answering is failed after 1 s
    (`cluster-node-timeout`), so a replica takes over within a few seconds."""

    def __init__(
        self,
        workdir: Path,
        masters: int = 3,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        replicas: int = 1,
    ) -> None:
        self.workdir = workdir
        self.password = password
        self.tls = tls  # (CA, cert, key): nodes, their bus and replication all speak TLS
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(self._node())
            addrs = self._addrs(self.nodes)
            self._cli("--cluster", "create", *addrs, "--cluster-replicas", str(replicas))
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _node(self) -> RedisServer:
        d = self.workdir / f"node-{len(self.nodes)}"
        d.mkdir()
        flags = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        # The bus port is chosen too: by default it is the port + 10000, which may not exist.
        flags += ["--cluster-node-timeout", "1000", "--cluster-port", str(free_port())]
        if self.password:
            flags += ["--masterauth", self.password]
        if self.tls is None:
            return RedisServer(d, self.password, extra=tuple(flags))
        ca, cert, key = self.tls
        flags += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        return RedisServer(d, self.password, tls_cert=(cert, key), extra=tuple(flags), tls_ca=ca)

    @staticmethod
    def _addrs(nodes: list[RedisServer]) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in nodes]

    def _cli(self, *args: str) -> str:
        cmd = ["redis-cli", "--cluster-yes"] if args[0] == "--cluster" else ["redis-cli"]
        if self.tls:
            cmd += ["--tls", "--cacert", str(self.tls[0])]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        return subprocess.run(
            [*cmd, *args], capture_output=True, text=True, check=True, timeout=120
        ).stdout

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss-cluster" if self.tls else "redis-cluster"
        return f"{scheme}://" + auth + ",".join(self._addrs(self.nodes))

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def topology(self) -> list[list[str]]:
        """`CLUSTER NODES` as a live node sees it, a list of fields per node."""
        return [line.split() for line in self.live()[0].cli("CLUSTER", "NODES").splitlines()]

    def masters(self) -> list[RedisServer]:
        """The live nodes that serve slots as primaries."""
        ports = {
            int(f[1].split("@")[0].rsplit(":", 1)[1])
            for f in self.topology()
            if "master" in f[2] and "fail" not in f[2] and len(f) > 8
        }
        return [n for n in self.live() if n.port in ports]

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every live node says the cluster is ok and all slots have a live primary."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [n.cli("CLUSTER", "INFO") for n in self.live()]
                if all("cluster_state:ok" in s for s in states) and self._covered():
                    return
            except subprocess.CalledProcessError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster is not ok after {timeout} s")
            time.sleep(0.1)

    def _covered(self) -> bool:
        """Whether all 16384 slots belong to live primaries, as every live node sees it."""
        for n in self.live():
            slots = 0
            for f in (line.split() for line in n.cli("CLUSTER", "NODES").splitlines()):
                if "master" in f[2] and "fail" not in f[2]:
                    for r in f[8:]:
                        if not r.startswith("["):
                            lo, _, hi = r.partition("-")
                            slots += int(hi or lo) - int(lo) + 1
            if slots != 16384:
                return False
        return True

    def wait_replicated(self, timeout: float = 60) -> None:
        """Until each replica holds as many keys as its primary (the tests only add keys)."""
        deadline = time.monotonic() + timeout
        by_id = {f[0]: f for f in self.topology()}
        pairs = []
        for f in by_id.values():
            if "slave" in f[2] and f[3] in by_id:
                pairs.append((self._node_at(f[1]), self._node_at(by_id[f[3]][1])))
        while any(r.cli("DBSIZE") != m.cli("DBSIZE") for r, m in pairs):
            if time.monotonic() > deadline:
                raise RuntimeError("replicas did not catch up")
            time.sleep(0.05)

    def _node_at(self, addr: str) -> RedisServer:
        port = int(addr.split("@")[0].rsplit(":", 1)[1])
        return next(n for n in self.nodes if n.port == port)

    def add_master(self, slots: int) -> RedisServer:
        """A new empty primary, then `slots` slots moved to it (with their keys) from the others."""
        node = self._node()
        self.nodes.append(node)
        seed = self._addrs(self.masters())[0]
        self._cli("--cluster", "add-node", f"127.0.0.1:{node.port}", seed)
        self.wait_ok()
        new_id = node.cli("CLUSTER", "MYID").strip()
        self._cli(
            "--cluster", "reshard", seed, "--cluster-from", "all", "--cluster-to", new_id,
            "--cluster-slots", str(slots),
        )  # fmt: skip
        self.wait_ok()
        return node

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


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
