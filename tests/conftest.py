import os
import socket

# Everything the tests start listens on 127.0.0.1 only. Ray 2.60 turns a node address of
# 127.0.0.1 into the machine's address (its gRPC servers then listen on every interface)
# unless this is 0. Read when ray is imported: so set before that, and inherited by the
# clusters that tests start in subprocesses.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import ray  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


START_ATTEMPTS = 3


def log_tails(lines: int = 20) -> str:
    """The end of the newest Ray session's raylet and GCS logs, to say why a start failed."""
    parts = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
        path = os.path.join("/tmp/ray/session_latest/logs", name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                parts.append(f"--- {path}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(parts) or "(no Ray session logs found)"


def start_ray() -> None:
    """`ray.init` for the test session, tried up to START_ATTEMPTS times.

    On a loaded 2-core CI machine Ray's head once missed its fixed 30 s window for the raylet
    to register ("The current node timed out during startup"), and every test errored. Only
    that start-up failure is retried: the processes the failed try started (this process's new
    children, by PID) are stopped first, and the logs' tails are printed."""
    import sys

    import psutil

    me = psutil.Process()
    for attempt in range(1, START_ATTEMPTS + 1):
        before = {child.pid for child in me.children(recursive=True)}
        try:
            ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1",
                     _metrics_export_port=METRICS_PORT, log_to_driver=False,
                     _system_config={"metrics_report_interval_ms": 1000})
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == START_ATTEMPTS:
                raise
            sys.__stderr__.write(f"\nray.init attempt {attempt} of {START_ATTEMPTS} failed: {exc}\n"
                                 f"{log_tails()}\n")
            ray.shutdown()
            started = [c for c in me.children(recursive=True) if c.pid not in before]
            for child in started:
                child.terminate()
            _, alive = psutil.wait_procs(started, timeout=10)
            for child in alive:
                child.kill()


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """One local Ray for the whole test session, with logical CPUs so 4-8 actors fit."""
    started = False
    if not ray.is_initialized():
        start_ray()
        started = True
    yield
    if started:
        ray.shutdown()


def alive_actor_names(prefix: str) -> list[str]:
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this session's Ray, even if others run
    return [a.name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
            if a.name and a.name.startswith(prefix)]


@pytest.fixture(autouse=True)
def keep_worker_identity_out_of_the_trainer():
    """An env worker built in-process (unit tests) sets RAY_COLLECTORS_WORKER_ID/_RESTARTS in
    this process's environment; left there, a later FaultyEnv built by a trainer would take
    the trainer for that worker (and, say, hang in it). Restored after every test."""
    import os

    names = ("RAY_COLLECTORS_WORKER_ID", "RAY_COLLECTORS_WORKER_RESTARTS")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture(autouse=True)
def shut_down_what_a_failing_test_left(request):
    """A test that fails half-way may skip its own shutdown calls: every collector and replay
    buffer handle still in this process is shut down then (its actors and shared-memory files
    go), so one failure cannot leak into the tests after it."""
    yield
    if not request.node.stash.get(FAILED, False):
        return
    import gc

    from collectors import DataCollectorBase, RayReplayBuffer

    for obj in gc.get_objects():  # type(), not isinstance(): some torch objects warn on __class__
        if issubclass(type(obj), DataCollectorBase):
            obj.shutdown(timeout=2, raise_on_error=False)
        elif issubclass(type(obj), RayReplayBuffer):
            obj.shutdown()
