import os

import pytest
import ray


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """One local Ray for the whole test session, with logical CPUs so 4-8 actors fit."""
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
                 _metrics_export_port=int(os.environ.get("RAY_COLLECTORS_TEST_METRICS_PORT", "0")) or None,
                 log_to_driver=False)
        started = True
    yield
    if started:
        ray.shutdown()


def alive_actor_names(prefix: str) -> list[str]:
    from ray.util.state import list_actors

    return [a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.name and a.name.startswith(prefix)]
