"""Joining Ray, secure by default: an embedded cluster on loopback with token authentication, or a
cluster at an address that is checked before anything is built.

- Embedded: Ray 2.60 starts a new local cluster with token authentication on, but resolves
  127.0.0.1 to the host's address and lets its gRPC servers listen on every interface. Ray keeps
  every server on loopback only where it treats the machine as a single-node host (macOS and
  Windows: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`), so the embedded cluster is started in that mode.
  Ray writes a missing token file under the umask (readable by every local user, who could then
  use the cluster), so the harness writes it first, readable by its owner alone.
- Joining: the driver hands the cluster its token and its work, so an address a job file names
  (anyone may write one) is joined only when the job (`cluster.trust_address`) or the user
  (`--trust-job-address`) vouches for it; `--address` is the user's own. The address must answer
  within `CONNECT_TIMEOUT_S` (ray.init would retry for minutes). A token found on this machine is
  used as `ray start` uses it for a joining node. A cluster that refuses the token (or its
  absence) is one line naming the fix. A cluster that also admits clients without a token is
  joined only with the user's `--allow-unauthenticated-cluster`, and then with a warning that names
  the risk: anyone who can reach its ports can run code on its nodes. That is learnt first, by
  trying to join without a token in a second process, because the driver must then join in the
  cluster's mode.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from harness.core.errors import HarnessError, one_line
from harness.job.spec import ClusterSpec

CONNECT_TIMEOUT_S = 10.0  # an address that does not answer by then is unreachable
AUTH_PROBE_S = 45.0  # the probe answers within seconds (Python and Ray start, 3 tries); on a loaded machine, more
SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node address 127.0.0.1, servers on loopback
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"  # the token itself; the file holding it
TOKEN_HINT = (
    "give it the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; "
    "`ray get-auth-token` on the head prints it)"
)
NO_AUTH_RISK = (
    "admits clients without token authentication: anyone who can reach its ports can run code on its nodes "
    "and read their data"
)
NO_AUTH_FIX = "restart it with RAY_AUTH_MODE=token (docs/cluster.md, Authentication)"
NO_AUTH_WARNING = f"warning: the Ray cluster at {{address}} {NO_AUTH_RISK}; {NO_AUTH_FIX}"


def connect(cluster: ClusterSpec, log: Callable[[str], None] = print) -> None:
    """Join the job's cluster (`cluster.address`) or start the embedded one; idempotent."""
    import ray

    if ray.is_initialized():
        return
    with _sigterm_kept():
        _start_or_join(cluster, log)


def _start_or_join(cluster: ClusterSpec, log: Callable[[str], None]) -> None:
    import ray

    if cluster.address is None:
        if _token_mode():
            _keep_token_private(create=True)
        with _single_host():
            # "local": a cluster of its own, never one another process started on this machine
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        return
    if not cluster.trust_address:
        raise HarnessError(
            f"cluster.address {cluster.address!r} comes from the job file, and joining it hands that host this "
            "machine's Ray token and the job's work: if you trust it, add `trust_address: true` to the job's "
            "cluster: section, pass --trust-job-address, or give it with --address"
        )
    _join(cluster.address, cluster.allow_unauthenticated, log)


def _join(address: str, allow_unauthenticated: bool, log: Callable[[str], None]) -> None:
    import ray
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    check_reachable(address)
    # The client's mode must be the cluster's: a driver in token mode on a cluster without it
    # cannot start actors there. So first learn whether the cluster admits a client without one.
    probe = _probe(address)
    if probe == ProbeResult.ADMITTED:
        if not allow_unauthenticated:
            raise HarnessError(
                f"cluster.address {address!r}: the cluster {NO_AUTH_RISK}; {NO_AUTH_FIX}, or pass "
                "--allow-unauthenticated-cluster to join it anyway"
            )
        os.environ[AUTH_MODE_ENV] = "disabled"
        log(NO_AUTH_WARNING.format(address=address))
    else:
        if _token_mode():
            _keep_token_private(create=False)
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # as `ray start` does on a node
        if probe == ProbeResult.REFUSED and not is_token_auth_enabled():
            raise HarnessError(
                f"cluster.address {address!r}: the cluster requires token authentication and this machine "
                f"has no token: {TOKEN_HINT}"
            )
    try:
        with _stderr_muted():  # Ray's core logs each refused try there; what went wrong is said once, below
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        if _refused_for_auth(exc):
            raise HarnessError(
                f"cluster.address {address!r}: the cluster refused this machine's token: {TOKEN_HINT}"
            ) from None
        raise HarnessError(f"cluster.address {address!r}: could not join ({one_line(exc)})") from None


def _token_mode() -> bool:
    """Whether Ray will use a token: RAY_AUTH_MODE=token, or unset (a new cluster's default, and a
    joining client's when it finds a token)."""
    return os.environ.get(AUTH_MODE_ENV, "token").lower() == "token"


def check_reachable(address: str) -> None:
    """Refuse, in one line, an address (`ray://host:port` or `host:port`; an IPv6 host in brackets,
    `[::1]:6379`) where nothing answers within CONNECT_TIMEOUT_S."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise HarnessError(
            f"cluster.address {address!r}: cannot reach a Ray cluster there ({one_line(exc)}); "
            "start one with `ray start --head` or fix the address"
        ) from None


def _keep_token_private(create: bool) -> None:
    """Make the token file Ray reads (`RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`) readable by
    its owner alone: whoever reads it can use the cluster. `~/.ray` loses group and other write
    (anyone who can write there can put a token of their own in place). With `create`, a missing
    `~/.ray/auth_token` is written here, private from its first byte, before Ray writes one under
    the umask. A file of another user is left as its owner keeps it; a token in `RAY_AUTH_TOKEN`
    has no file."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    if os.environ.get(TOKEN_ENV):
        return
    given = os.environ.get(TOKEN_PATH_ENV)
    path = Path(given).expanduser() if given else Path.home() / ".ray" / "auth_token"
    try:
        if not given:  # a folder RAY_AUTH_TOKEN_PATH names (/tmp, say) is not the harness's to change
            if create:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _clear_mode(path.parent, stat.S_IWGRP | stat.S_IWOTH)
            if create:
                with contextlib.suppress(FileExistsError):  # one already there is the token in use
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w") as f:
                        f.write(generate_new_authentication_token())  # what Ray would write
        _clear_mode(path, 0o077)
    except OSError as exc:
        raise HarnessError(f"{path}: cannot make the Ray token file private ({one_line(exc)})") from None


def _clear_mode(path: Path, bits: int) -> None:
    """Clear `bits` of the mode of `path` (when it exists and is this user's)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid == os.getuid() and st.st_mode & bits:
        path.chmod(stat.S_IMODE(st.st_mode) & ~bits)


class ProbeResult(enum.IntEnum):
    """How a client without a token fared (the probe process's exit code)."""

    ADMITTED = 0
    REFUSED = 3  # the cluster asked for a token
    FAILED = 4  # something else went wrong: not known


def _probe(address: str) -> ProbeResult:
    """Try to join `address` without a token, in a second process (a process joins Ray once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    # a refused client is retried once a second for 20 s by default: 3 tries tell
    env |= {AUTH_MODE_ENV: "disabled", "RAY_gcs_server_port_wait_time_s": "3"}
    code = "import sys; from harness.run.cluster import probe_main; sys.exit(probe_main(sys.argv[1]))"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, address], env=env, capture_output=True, timeout=AUTH_PROBE_S, check=False
        )
    except subprocess.TimeoutExpired:
        return ProbeResult.FAILED
    return ProbeResult(done.returncode) if done.returncode in set(ProbeResult) else ProbeResult.FAILED


def probe_main(address: str) -> int:
    """The probe process: join `address` as the environment says, and exit with a `ProbeResult`."""
    import ray

    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        return ProbeResult.REFUSED if _refused_for_auth(exc) else ProbeResult.FAILED
    ray.shutdown()
    return ProbeResult.ADMITTED


def _refused_for_auth(exc: BaseException) -> bool:
    """Whether ray.init failed because the cluster refused the client's authentication (Ray says so
    in an exception chained below its ConnectionError, or only in that exception's text)."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """ray.init replaces the process's SIGTERM handler with one that exits at once; the caller's
    (the CLI stops a run on SIGTERM as on Ctrl-C, keeping its work) is put back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """File descriptor 2 to /dev/null: Ray's C++ core writes there directly, past sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _single_host() -> Iterator[None]:
    """Ray's single-host mode, for the processes `ray.init` starts (they inherit the environment)
    and for this one (Ray read the setting when it was imported)."""
    from ray._private import ray_constants

    saved_env, saved = os.environ.get(SINGLE_HOST_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_HOST_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(SINGLE_HOST_ENV, None)
        else:
            os.environ[SINGLE_HOST_ENV] = saved_env
