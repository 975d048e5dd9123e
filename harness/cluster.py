"""Joining Ray, secure by default: an embedded cluster on loopback with token authentication, or a
cluster at an address that is checked before anything is built.

- Embedded: Ray 2.60 starts a new local cluster with token authentication on, but resolves
  127.0.0.1 to the host's address and lets its gRPC servers listen on every interface. Ray keeps
  every server on loopback only where it treats the machine as a single-node host (macOS and
  Windows: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`), so the embedded cluster is started in that mode.
- Joining: the address must answer within `CONNECT_TIMEOUT_S` (ray.init would retry for minutes).
  A token found on this machine is used as `ray start` uses it for a joining node. A cluster that
  refuses the token (or its absence) is one line naming the fix. A cluster that also admits
  clients without a token is joined with a warning that names the risk: anyone who can reach its
  ports can run code on its nodes. That is learnt by trying, in a second process, to join with
  authentication off.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

from harness.core.errors import HarnessError, one_line
from harness.spec import ClusterSpec

CONNECT_TIMEOUT_S = 10.0  # an address that does not answer by then is unreachable
AUTH_PROBE_S = 15.0  # the probe's answer, either way, well within this (Python and Ray start, 3 tries)
SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node address 127.0.0.1, servers on loopback
AUTH_MODE_ENV = "RAY_AUTH_MODE"
NO_AUTH_WARNING = (
    "warning: the Ray cluster at {address} admits clients without token authentication: anyone who "
    "can reach its ports can run code on its nodes and read their data; restart it with "
    "RAY_AUTH_MODE=token (docs/cluster.md, Authentication)"
)


def connect(cluster: ClusterSpec, log: Callable[[str], None] = print) -> None:
    """Join the job's cluster (`cluster.address`) or start the embedded one; idempotent."""
    import ray

    if ray.is_initialized():
        return
    if cluster.address is None:
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
    _join(cluster.address, log)


def _join(address: str, log: Callable[[str], None]) -> None:
    import ray
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise HarnessError(
            f"cluster.address {address!r}: cannot reach a Ray cluster there ({one_line(exc)}); "
            "start one with `ray start --head` or fix the address"
        ) from None
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    probe = _join_without_token(address)
    try:
        with _stderr_muted():  # Ray's core logs each refused try there; what went wrong is said once, below
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:
        if _refused_for_auth(exc):
            raise HarnessError(
                f"cluster.address {address!r}: the cluster refused this client's token authentication; "
                "set RAY_AUTH_MODE=token and give it the cluster's token (RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            ) from None
        raise HarnessError(f"cluster.address {address!r}: could not join ({one_line(exc)})") from None
    finally:
        admitted = _wait(probe)
    if admitted:
        log(NO_AUTH_WARNING.format(address=address))


def _join_without_token(address: str) -> subprocess.Popen[bytes]:
    """A second process that tries to join `address` with authentication off and exits 0 if it could."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    # a refused client is retried once a second for 20 s by default: 3 tries tell
    env |= {AUTH_MODE_ENV: "disabled", "RAY_gcs_server_port_wait_time_s": "3"}
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False); ray.shutdown()"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, address], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _wait(probe: subprocess.Popen[bytes]) -> bool:
    """Whether the probe joined (no answer within AUTH_PROBE_S: not known, so no warning)."""
    try:
        return probe.wait(timeout=AUTH_PROBE_S) == 0
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        return False


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
