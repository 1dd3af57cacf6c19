import socket

import pytest
import ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """One local Ray for the whole test session, with logical CPUs so 4-8 actors fit."""
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1",
                 _metrics_export_port=METRICS_PORT, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": 1000})
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
