"""TorchRL's ways to look into a collector and its workers: ``get_distant_attr``, ``map_fn``
and ``fake_tensordict``.

A single-worker collector answers on itself, as TorchRL's ``Collector`` does; a name it does not
have (``env``) is looked up in its env actor. Multi collectors answer per worker, one entry each,
from the env actors (see :class:`~actors.stepping.env_worker.WorkerView`: ``env``, ``policy``,
``frames_per_batch``, ``worker_idx``, ``policy_version``).

    >>> c = SyncDataCollector("CartPole-v1", frames_per_batch=10)  # doctest: +SKIP
    >>> c.get_distant_attr("env.spec.id")  # doctest: +SKIP
    'CartPole-v1'
    >>> c.fake_tensordict().batch_size  # doctest: +SKIP
    torch.Size([10])
"""
from __future__ import annotations

import ray
from ray.exceptions import RayTaskError

from actors.errors import unwrap
from actors.stepping.attr_path import resolve
from collectors.batch import assemble, finish
from collectors.control import CONTROL_TIMEOUT_S
from collectors.runtime import driver_get

# what map_fn maps on multi collectors
PER_WORKER_METHODS = ("update_policy_weights_", "reset", "get_distant_attr")


def _calls(list_of_args, list_of_kwargs, count: int | None) -> tuple[list, list]:
    """TorchRL's pairing of ``list_of_args`` with ``list_of_kwargs`` (``count``: one per worker)."""
    if list_of_args is None and list_of_kwargs is None:
        n = 1 if count is None else count
        return [()] * n, [{}] * n
    if list_of_args is None:
        list_of_args = [()] * len(list_of_kwargs)
    if list_of_kwargs is None:
        list_of_kwargs = [{}] * len(list_of_args)
    if len(list_of_args) != len(list_of_kwargs):
        raise ValueError(f"list_of_args and list_of_kwargs must have the same length; got "
                         f"{len(list_of_args)} and {len(list_of_kwargs)}.")
    if count is not None and len(list_of_args) != count:
        raise ValueError(f"map_fn on a multi collector takes one entry per worker: Expected "
                         f"{count} argument entries, got {len(list_of_args)}.")
    return [tuple(a) for a in list_of_args], [dict(k) for k in list_of_kwargs]


class IntrospectionMixin:
    """``get_distant_attr``, ``map_fn``, ``fake_tensordict`` for ``DataCollectorBase``."""

    def _from_workers(self, method: str, *args, workers=None) -> list:
        """``method(*args)`` in each env actor (all by default), in worker order; an error
        raised there is raised here as itself."""
        self._check_open()
        handles = driver_get(self._driver.worker_handles.remote(), CONTROL_TIMEOUT_S)
        workers = range(self.num_workers) if workers is None else workers
        refs = [getattr(handles[i], method).remote(*args) for i in workers]
        out, error = [], None
        for ref in refs:  # every answer is read (none left as an unhandled error)
            try:
                out.append(ray.get(ref, timeout=CONTROL_TIMEOUT_S))
            except RayTaskError as exc:
                error = error or unwrap(exc)
        if error is not None:
            raise error
        return out

    def get_distant_attr(self, attr: str):
        """The attribute at path ``attr`` (``"env.transform[0].loc"``): one value for a
        single-worker collector, a list (one per worker) for multi collectors."""
        if self._multi:
            return self._from_workers("distant_attr", attr)
        try:
            return resolve(self, attr)
        except AttributeError:
            head = attr.strip().split(".")[0].split("[")[0]
            if hasattr(self, head):
                raise
        return self._from_workers("distant_attr", attr, workers=[0])[0]

    def map_fn(self, method_name: str, list_of_args=None, list_of_kwargs=None) -> list:
        """Call ``method_name`` once per entry of ``list_of_args`` / ``list_of_kwargs``.

        A single-worker collector calls its own method (as TorchRL's ``Collector``). A multi
        collector takes one entry per worker and calls the method for that worker; the methods
        that have a per-worker meaning here are ``update_policy_weights_`` (weights, or ``()``
        for the trainer's policy), ``reset`` (no arguments) and ``get_distant_attr`` (a path
        in that worker); others raise ``NotImplementedError``.
        """
        self._check_open()
        if not self._multi:
            method = resolve(self, method_name)
            if not callable(method):
                raise AttributeError(f"{method_name!r} of {type(self).__name__} is not callable.")
            args, kwargs = _calls(list_of_args, list_of_kwargs, None)
            return [method(*a, **k) for a, k in zip(args, kwargs)]
        args, kwargs = _calls(list_of_args, list_of_kwargs, self.num_workers)
        if method_name == "update_policy_weights_":
            for i, (a, k) in enumerate(zip(args, kwargs)):
                self.update_policy_weights_(*a, **dict(k, worker_ids=[i]))
            return [None] * self.num_workers
        if method_name == "get_distant_attr":  # worker i's attribute at its own path
            return [self._from_workers("distant_attr", *a, *k.values(), workers=[i])[0]
                    for i, (a, k) in enumerate(zip(args, kwargs))]
        if method_name == "reset":
            if any(args) or any(kwargs):
                raise TypeError("map_fn('reset') on a multi collector takes no arguments per "
                                "worker (each worker resets all its envs); use reset(reset_idx=...) "
                                "for some workers.")
            self.reset()
            return [None] * self.num_workers
        raise NotImplementedError(
            f"map_fn({method_name!r}) on {type(self).__name__}: env actors are not TorchRL "
            f"collectors; per-worker calls exist for {', '.join(PER_WORKER_METHODS)}. Call the "
            "collector's own method, or get_distant_attr() to read a worker's attribute.")

    def fake_tensordict(self):
        """A zero-filled batch shaped like the next one this collector yields (keys, shapes,
        dtypes, after ``postproc``, ``split_trajs``, ``set_truncated``...): for storage set-up
        or warm-up without stepping an env."""
        workers = [0] if self._async or not self._multi else list(range(self.num_workers))
        parts = self._from_workers("fake_batch", workers=workers)
        layout = "single" if self._async else self._layout
        batch = assemble(parts, workers if self._multi else None, layout, self.options.compact_obs,
                         self.spec.get("env_shape"))
        return finish(batch, self.options, self.postproc, self._masked, self.spec.get("nested"))
