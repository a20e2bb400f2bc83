"""Redis deployments for the tests, from the local ``redis-server`` / ``redis-cli`` binaries.

- ``single``: one server (plain TCP);
- ``tls``: one server on a TLS port only, certificates from a throwaway CA
  (``openssl``), clients trust it through ``NZ_REDIS_CA_FILE``;
- ``cluster``: a Redis Cluster of 3 masters and 3 replicas
  (``cluster-enabled yes``, created with ``redis-cli --cluster create``);
- ``sentinel``: one master, one replica and three sentinels, reached through
  ``redis+sentinel://h1:p1,h2:p2,h3:p3/<master>/<db>``.

Every process runs in its own temporary directory on a free loopback port
and keeps nothing on disk; :meth:`RedisDeployment.destroy` stops them all.
Chaos tests stop and start single nodes through :attr:`RedisDeployment.nodes`
(only processes started here, never the machine's own Redis).

``NZ_TEST_REDIS_DEPLOYMENTS`` (comma-separated, default all four) chooses
the deployments the parametrised suites run on.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neuronetz_gateway.devstack.servers import MissingDependency, free_port, wait_port

__all__ = [
    "ALL_DEPLOYMENTS",
    "RedisDeployment",
    "RedisNode",
    "chosen_deployments",
    "start_deployment",
]

ALL_DEPLOYMENTS = ("single", "cluster", "sentinel", "tls")
SENTINEL_MASTER = "nzmaster"
_READY_SECONDS = 30.0


def chosen_deployments() -> tuple[str, ...]:
    """The deployments named by ``NZ_TEST_REDIS_DEPLOYMENTS`` (default: all)."""
    raw = os.environ.get("NZ_TEST_REDIS_DEPLOYMENTS", "").strip()
    if not raw:
        return ALL_DEPLOYMENTS
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_DEPLOYMENTS]
    if unknown:
        raise ValueError(
            f"NZ_TEST_REDIS_DEPLOYMENTS: unknown {unknown}, choose from {ALL_DEPLOYMENTS}"
        )
    return names


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so below 55536)."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        if _port_is_free(port) and _port_is_free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise MissingDependency(f"{name} not found on PATH (apt-get install redis-server)")
    return path


@dataclass
class RedisNode:
    """One ``redis-server`` process (a server or a sentinel) that can be stopped and restarted."""

    argv: list[str]
    port: int
    workdir: Path
    tls: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process and wait until its port accepts connections."""
        log = (self.workdir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            self.argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_port(self.port, 15)

    def kill(self) -> None:
        """SIGKILL: the node is gone at once, as after a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class RedisDeployment:
    """A started deployment: the URL the gateway is given, its CA file, its processes."""

    kind: str
    url: str
    workdir: Path
    ca_file: str | None = None
    nodes: list[RedisNode] = field(default_factory=list)
    sentinels: list[RedisNode] = field(default_factory=list)

    def cli(self, node: RedisNode, *args: str) -> str:
        """``redis-cli`` against one node (TLS when the node speaks it)."""
        argv = [_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(node.port)]
        if node.tls:
            argv += [*self._tls_cli_args()]
        result = subprocess.run([*argv, *args], capture_output=True, timeout=30, check=True)
        return result.stdout.decode()

    def _tls_cli_args(self) -> list[str]:
        certs = self.workdir / "certs"
        return ["--tls", "--cacert", str(certs / "ca.crt")]

    def destroy(self) -> None:
        """Stop every process and remove the working directory."""
        for node in [*self.sentinels, *self.nodes]:
            node.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _server_argv(port: int, workdir: Path, *extra: str, tls: Path | None = None) -> list[str]:
    argv = [
        _binary("redis-server"),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    if tls is None:
        argv += ["--port", str(port)]
    else:
        argv += [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(tls / "server.crt"),
            "--tls-key-file",
            str(tls / "server.key"),
            "--tls-ca-cert-file",
            str(tls / "ca.crt"),
            "--tls-auth-clients",
            "no",
            "--tls-replication",
            "yes",
        ]
    return [*argv, *extra]


def _node(base: Path, name: str, *extra: str, tls: Path | None = None) -> RedisNode:
    port = cluster_port() if "--cluster-enabled" in extra else free_port()
    workdir = base / name
    workdir.mkdir()
    argv = _server_argv(port, workdir, *extra, tls=tls)
    node = RedisNode(argv=argv, port=port, workdir=workdir, tls=tls is not None)
    node.start()
    return node


def make_certificates(directory: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost, signed by it."""
    openssl = _binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, capture_output=True, timeout=60, check=True)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=nz-test-ca", "-keyout", "ca.key", "-out", "ca.crt",
    )  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr",
    )  # fmt: skip
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "san.ext",
    )  # fmt: skip
    return directory


def _wait(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + _READY_SECONDS
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except subprocess.SubprocessError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"redis deployment not ready: {what}")


def _start_single(base: Path, tls: bool) -> RedisDeployment:
    certs = make_certificates(base / "certs") if tls else None
    node = _node(base, "server", tls=certs)
    scheme = "rediss" if tls else "redis"
    return RedisDeployment(
        kind="tls" if tls else "single",
        url=f"{scheme}://127.0.0.1:{node.port}/0",
        workdir=base,
        ca_file=str(certs / "ca.crt") if certs else None,
        nodes=[node],
    )


def _start_cluster(base: Path, tls: bool) -> RedisDeployment:
    certs = make_certificates(base / "certs") if tls else None
    extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
    extra += ["--cluster-config-file", "nodes.conf"]
    if tls:
        extra += ["--tls-cluster", "yes"]
    deployment = RedisDeployment(
        kind="cluster+tls" if tls else "cluster",
        url="",
        workdir=base,
        ca_file=str(certs / "ca.crt") if certs else None,
    )
    try:
        deployment.nodes = [_node(base, f"node{i}", *extra, tls=certs) for i in range(6)]
        addresses = [f"127.0.0.1:{n.port}" for n in deployment.nodes]
        deployment.cli(
            deployment.nodes[0], "--cluster", "create", *addresses,
            "--cluster-replicas", "1", "--cluster-yes",
        )  # fmt: skip
        for node in deployment.nodes:
            _wait(
                f"cluster state on {node.port}",
                lambda node=node: "cluster_state:ok" in deployment.cli(node, "CLUSTER", "INFO"),
            )
        # every node must know every other one's role before clients ask for slots
        _wait(
            "replicas attached",
            lambda: (
                sum(
                    "role:slave" in deployment.cli(n, "INFO", "replication")
                    and "master_link_status:up" in deployment.cli(n, "INFO", "replication")
                    for n in deployment.nodes
                )
                == 3
            ),
        )
    except BaseException:
        deployment.destroy()
        raise
    scheme = "rediss" if tls else "redis"
    deployment.url = f"{scheme}://127.0.0.1:{deployment.nodes[0].port}/0"
    return deployment


def _start_sentinel(base: Path) -> RedisDeployment:
    deployment = RedisDeployment(kind="sentinel", url="", workdir=base)
    try:
        master = _node(base, "master")
        replica = _node(base, "replica", "--replicaof", "127.0.0.1", str(master.port))
        deployment.nodes = [master, replica]
        _wait(
            "replica linked",
            lambda: "master_link_status:up" in deployment.cli(replica, "INFO", "replication"),
        )
        for i in range(3):
            port = free_port()
            workdir = base / f"sentinel{i}"
            workdir.mkdir()
            conf = workdir / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
                f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 5000\n"
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
            )
            node = RedisNode(
                argv=[_binary("redis-server"), str(conf), "--sentinel"], port=port, workdir=workdir
            )
            node.start()
            deployment.sentinels.append(node)
        for sentinel in deployment.sentinels:
            _wait(
                "sentinels see the replica and each other",
                lambda s=sentinel: _sentinel_ready(deployment, s),
            )
    except BaseException:
        deployment.destroy()
        raise
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in deployment.sentinels)
    deployment.url = f"redis+sentinel://{hosts}/{SENTINEL_MASTER}/0"
    return deployment


def _sentinel_ready(deployment: RedisDeployment, sentinel: RedisNode) -> bool:
    replicas = deployment.cli(sentinel, "SENTINEL", "REPLICAS", SENTINEL_MASTER)
    others = deployment.cli(sentinel, "SENTINEL", "SENTINELS", SENTINEL_MASTER)
    return "127.0.0.1" in replicas and others.count("127.0.0.1") >= 2


def start_deployment(kind: str, parent: str | None = None) -> RedisDeployment:
    """Start one deployment by name (see :data:`ALL_DEPLOYMENTS`; also ``cluster+tls``)."""
    base = Path(tempfile.mkdtemp(prefix=f"nz-redis-{kind.replace('+', '-')}-", dir=parent))
    try:
        if kind == "single":
            return _start_single(base, tls=False)
        if kind == "tls":
            return _start_single(base, tls=True)
        if kind == "cluster":
            return _start_cluster(base, tls=False)
        if kind == "cluster+tls":
            return _start_cluster(base, tls=True)
        if kind == "sentinel":
            return _start_sentinel(base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    shutil.rmtree(base, ignore_errors=True)
    raise ValueError(f"unknown redis deployment {kind!r}")


def stop_all(deployments: Sequence[RedisDeployment]) -> None:
    for deployment in deployments:
        deployment.destroy()
