"""Secure by default (real Ray processes): the embedded cluster listens on loopback only, with token
authentication on; joining a cluster that admits clients without a token warns; a cluster that
refuses the client's (absent) token is one line, exit 2."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from harness.run.cluster import NO_AUTH_WARNING
from tests.conftest import ROOT

EMBEDDED = """
import os, signal, sys
from harness.run.cluster import connect
from harness.job.spec import ClusterSpec
signal.signal(signal.SIGTERM, signal.default_int_handler)  # as `run` does: SIGTERM stops a run as Ctrl-C
connect(ClusterSpec())
from ray._private.authentication.authentication_utils import is_token_auth_enabled
print("token", is_token_auth_enabled())
print("pid", os.getpid())
print("sigterm", signal.getsignal(signal.SIGTERM) is signal.default_int_handler)
sys.stdout.flush()
sys.stdin.read()  # stay up until the test has read the sockets
"""

# a Ray head of its own (ray.cluster_utils: real GCS and raylet), started under the environment
# the test gives it; prints its address, and shuts down when its stdin closes
HEAD = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""

JOIN = "import sys; from harness.run.cluster import connect; from harness.job.spec import ClusterSpec; " \
    "connect(ClusterSpec(address=sys.argv[1])); print('joined')"  # fmt: skip


def _listening(pids: set[int]) -> list[str]:
    """`ip:port` of every TCP socket in LISTEN state that one of `pids` holds (from /proc)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                out.append(f"{_ip(address, width)}:{int(port, 16)}")
    return out


def _ip(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc prints each 32-bit word in host (little-endian) order
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
    flat = b"".join(words)
    if width == 8:
        return ".".join(str(b) for b in flat)
    if flat[:12] == b"\0" * 10 + b"\xff\xff":  # an IPv4-mapped IPv6 address
        return ".".join(str(b) for b in flat[12:])
    return "::" if flat == bytes(16) else flat.hex()


def _descendants(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    family, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return family


def test_the_embedded_cluster_listens_on_loopback_only_with_token_auth_and_sigterm_stays_ours():
    proc = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        token, pid = proc.stdout.readline().split()[1], int(proc.stdout.readline().split()[1])
        sigterm = proc.stdout.readline().split()[1]
        sockets = _listening(_descendants(pid))
    finally:
        proc.communicate("", timeout=60)
    assert token == "True"
    assert sigterm == "True"  # ray.init's own SIGTERM handler (exit at once) did not stay
    assert len(sockets) >= 3, sockets  # GCS, raylet, workers: what is checked was found
    assert all(s.startswith("127.0.0.1:") for s in sockets), sockets


@contextlib.contextmanager
def _head(env: dict[str, str]) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.communicate("", timeout=120)


def _env(home: Path, **auth: str) -> dict[str, str]:
    """This environment without Ray authentication settings, with its own HOME (no ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    return env | {"HOME": str(home), "PYTHONPATH": str(ROOT)} | auth


def test_joining_a_cluster_without_token_auth_warns_naming_the_risk(tmp_path):
    with _head(_env(tmp_path, RAY_AUTH_MODE="disabled")) as address:
        proc = subprocess.run(
            [sys.executable, "-c", JOIN, address], capture_output=True, text=True, env=_env(tmp_path), timeout=120
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert NO_AUTH_WARNING.format(address=address) in proc.stdout
    assert proc.stdout.strip().endswith("joined")


def test_a_token_found_on_this_machine_joins_a_cluster_with_token_auth_without_warning(tmp_path):
    token = {"RAY_AUTH_TOKEN": "a" * 32}
    with _head(_env(tmp_path, RAY_AUTH_MODE="token", **token)) as address:
        proc = subprocess.run(
            [sys.executable, "-c", JOIN, address], capture_output=True, text=True, env=_env(tmp_path, **token),
            timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "joined"  # the probe without a token was refused: no warning


def test_a_cluster_refusing_the_client_is_one_line_exit_2(tmp_path):
    job = ROOT / "jobs" / "librispeech_tiny_en.yaml"
    with _head(_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="b" * 32)) as address:
        proc = subprocess.run(
            [sys.executable, "-m", "harness", "run", str(job), "--address", address, "--out", str(tmp_path / "r"),
             "--models", str(tmp_path / "m")],
            capture_output=True, text=True, env=_env(tmp_path), timeout=300,
        )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "requires token authentication and this machine has no token" in proc.stderr
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())  # nothing built
