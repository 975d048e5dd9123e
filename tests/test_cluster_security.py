"""Secure by default (real Ray processes): the embedded cluster listens on loopback only, with token
authentication on and its token file private; a job file's address is joined only when the job or
the user trusts it; joining a cluster that admits clients without a token needs the user's opt-in
(then it warns); a cluster that refuses the client's (absent) token is one line, exit 2."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.core.errors import HarnessError
from harness.run.cluster import NO_AUTH_WARNING
from tests.conftest import EMBEDDED as EMBEDDED_DATA
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

# joins the address in argv[1] as `--address` does (the user's own flag: trusted); argv[2:] are
# ClusterSpec's other flags set to true
JOIN = "import sys; from harness.run.cluster import connect; from harness.job.spec import ClusterSpec; " \
    "connect(ClusterSpec(address=sys.argv[1], trust_address=True, **dict.fromkeys(sys.argv[2:], True))); " \
    "print('joined')"  # fmt: skip

# the embedded cluster under the usual umask (022: files readable by all unless made private); prints
# the modes of the token file Ray reads and of its folder
EMBEDDED_TOKEN = """
import os
os.umask(0o022)
from harness.run.cluster import connect
from harness.job.spec import ClusterSpec
connect(ClusterSpec())
folder = os.path.expanduser("~/.ray")
print(oct(os.stat(os.path.join(folder, "auth_token")).st_mode & 0o777), oct(os.stat(folder).st_mode & 0o777))
"""


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


def _run(tmp_path: Path, job: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m harness run JOB FLAGS` of one utterance into tmp_path's results/ and models/."""
    return subprocess.run(
        [sys.executable, "-m", "harness", "run", str(job), "--limit", "1", "--out", str(tmp_path / "r"), "--models",
         str(tmp_path / "m"), *flags],
        capture_output=True, text=True, env=env or _env(tmp_path), timeout=300,
    )  # fmt: skip


def _job(tmp_path: Path, cluster: str = "{}") -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"name: j\ndataset: {{path: {EMBEDDED_DATA}}}\nmodels: {{sizes: [tiny.en]}}\ncluster: {cluster}\n")
    return job


def _refused(proc: subprocess.CompletedProcess, tmp_path: Path, *expected: str) -> None:
    """Exit 2 with one line saying each of `expected`, and nothing built."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
    assert not (tmp_path / "r").exists()


def test_joining_a_cluster_without_token_auth_needs_the_users_opt_in_then_warns(tmp_path):
    with _head(_env(tmp_path, RAY_AUTH_MODE="disabled")) as address:
        refused = _run(tmp_path, _job(tmp_path), "--address", address)
        joined = subprocess.run(
            [sys.executable, "-c", JOIN, address, "allow_unauthenticated"], capture_output=True, text=True,
            env=_env(tmp_path), timeout=120,
        )  # fmt: skip
    _refused(refused, tmp_path, "admits clients without token authentication", "--allow-unauthenticated-cluster")
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert NO_AUTH_WARNING.format(address=address) in joined.stdout
    assert joined.stdout.strip().endswith("joined")


def test_an_address_from_a_job_file_is_refused_unless_the_job_or_the_user_trusts_it(tmp_path):
    """The driver hands the host it joins this machine's Ray token: a job file (written by anyone)
    may not name that host on its own. Refused before any connection: the listener hears nothing."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        job = _job(tmp_path, f"{{address: '127.0.0.1:{listener.getsockname()[1]}'}}")
        proc = _run(tmp_path, job)
        with pytest.raises(BlockingIOError):  # no connection is waiting
            listener.accept()
    _refused(proc, tmp_path, "comes from the job file", "trust_address: true", "--trust-job-address")
    # trusted by the job or by the user, it is joined: here a cluster that then asks for the other opt-in
    with _head(_env(tmp_path, RAY_AUTH_MODE="disabled")) as address:
        by_flag = _run(tmp_path, _job(tmp_path, f"{{address: '{address}'}}"), "--trust-job-address")
        by_job = _run(tmp_path, _job(tmp_path, f"{{address: '{address}', trust_address: true}}"))
    for proc in (by_flag, by_job):
        _refused(proc, tmp_path, f"cluster.address {address!r}: the cluster admits clients without token")


@pytest.mark.unit
def test_a_job_file_cannot_allow_an_unauthenticated_cluster(tmp_path):
    from harness.job.spec import load_job

    with pytest.raises(HarnessError, match=r"cluster\.allow_unauthenticated: .*--allow-unauthenticated-cluster"):
        load_job(_job(tmp_path, "{address: 'head:6379', allow_unauthenticated: true}"))


@pytest.mark.unit
def test_a_bracketed_ipv6_host_is_an_address(tmp_path):
    """`ray://[::1]:10001` and `[::1]:6379`: a real listener on the IPv6 loopback answers both."""
    from harness.run.cluster import check_reachable

    with socket.create_server(("::1", 0), family=socket.AF_INET6) as listener:
        port = listener.getsockname()[1]
        for address in (f"ray://[::1]:{port}", f"[::1]:{port}"):
            check_reachable(address)
    with pytest.raises(HarnessError, match=r"cannot reach a Ray cluster there"):
        check_reachable(f"[::1]:{port}")  # closed now


@pytest.mark.parametrize("home", ["fresh", "loose"])
def test_the_embedded_clusters_token_file_is_private(tmp_path, home):
    """Fresh: the token file is made private from the start. Loose: a token file anyone could read,
    in a folder anyone could write to, is tightened, and its token kept."""
    folder = tmp_path / ".ray"
    if home == "loose":
        folder.mkdir()
        folder.chmod(0o777)
        (folder / "auth_token").write_text("d" * 64)
        (folder / "auth_token").chmod(0o644)
    proc = subprocess.run(
        [sys.executable, "-c", EMBEDDED_TOKEN], capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    token_mode, folder_mode = proc.stdout.split()
    assert token_mode == "0o600"
    assert int(folder_mode, 8) & 0o022 == 0, folder_mode  # no one else may put a token of their own there
    if home == "loose":
        assert (folder / "auth_token").read_text() == "d" * 64


def test_joining_with_a_token_file_makes_it_private(tmp_path):
    token = "c" * 64
    folder = tmp_path / ".ray"
    folder.mkdir()
    folder.chmod(0o777)
    (folder / "auth_token").write_text(token)
    (folder / "auth_token").chmod(0o644)
    (tmp_path / "head").mkdir()
    with _head(_env(tmp_path / "head", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)) as address:
        proc = subprocess.run(
            [sys.executable, "-c", JOIN, address], capture_output=True, text=True, env=_env(tmp_path), timeout=120
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "joined"
    assert (folder / "auth_token").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o022 == 0


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
        proc = _run(tmp_path, job, "--address", address)
    _refused(proc, tmp_path, "requires token authentication and this machine has no token")
