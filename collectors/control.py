"""What a collector does between batches: seeds, resets, policy weights, state."""
from __future__ import annotations

import time

from types import SimpleNamespace

import ray
import torch

from actors.options import CollectorOptions
from collectors.runtime import driver_get as _ray_get

CONTROL_TIMEOUT_S = 30.0  # bound of control calls (they never wait behind a batch in flight)
AUTO_SYNC_POLL_S = 0.05  # during start(): how often the trainer's policy is checked for changes


class ControlMixin:
    """``DataCollectorBase``'s control methods (the driver's ``broadcast`` and weight calls)."""

    profile_config = None  # TorchRL's: enable_profile()'s settings, until disable_profile()

    def set_seed(self, seed: int, static_seed: bool = False) -> int:
        """Seed every env and the policy RNGs; every env starts a new episode from it.

        Env ``k`` of the run (worker ``w``, env ``e``: ``k = w * num_envs + e``) gets
        ``seed + k``; with ``static_seed=True`` every env gets ``seed`` itself. Returns the last
        seed used, as TorchRL does.
        """
        self._check_open()
        seed = CollectorOptions.build(type(self).__name__, frames_per_batch=1, seed=seed).seed
        if not isinstance(static_seed, bool):
            raise TypeError(f"static_seed must be a bool; got {static_seed!r}.")
        _ray_get(self._driver.set_seed.remote(seed, static_seed), timeout=CONTROL_TIMEOUT_S)
        return int(seed) if static_seed else int(seed) + self.num_workers * self.num_envs - 1

    def reset(self, reset_idx=None, *, index=None) -> None:
        """Start fresh episodes (and trajectory ids) at the next batch.

        ``reset_idx`` (TorchRL's multi collectors) or ``index`` (TorchRL's ``Collector``): a
        sequence of bools, one per worker for multi collectors (all envs of the worker), one
        per env for a single-worker collector with ``num_envs > 1``. ``None`` resets all.
        """
        self._check_open()
        if reset_idx is not None and index is not None:
            raise TypeError("reset() takes reset_idx or index, not both.")
        mask = reset_idx if reset_idx is not None else index
        if mask is None:
            _ray_get(self._driver.broadcast.remote("reset"), timeout=CONTROL_TIMEOUT_S)
            if getattr(self, "_trajs", None) is not None:  # their episodes end unfinished
                self._trajs.clear()
            return
        flags = [bool(x) for x in (mask.tolist() if hasattr(mask, "tolist") else mask)]
        if self._multi:
            if len(flags) != self.num_workers:
                raise ValueError(f"reset_idx has {len(flags)} entries; expected one per worker "
                                 f"({self.num_workers}).")
            calls = {w: ("reset", ()) for w, f in enumerate(flags) if f}
        else:
            if len(flags) != self.num_envs:
                raise ValueError(f"reset index has {len(flags)} entries; expected one per env "
                                 f"({self.num_envs}).")
            calls = {0: ("reset", ([e for e, f in enumerate(flags) if f],))}
        _ray_get(self._driver.call_workers.remote(calls), timeout=CONTROL_TIMEOUT_S)

    def enable_profile(self, *, workers=None, num_rollouts: int = 3, warmup_rollouts: int = 1,
                       save_path=None, activities=None, record_shapes: bool = True,
                       profile_memory: bool = False, with_stack: bool = True,
                       with_flops: bool = False, on_trace_ready=None) -> None:
        """Profile env actors' batches with ``torch.profiler`` (TorchRL's method, its arguments).

        ``workers`` (default ``[0]``) run their next ``num_rollouts`` batches under the
        profiler; the first ``warmup_rollouts`` are discarded. The trace goes to ``save_path``
        (``{worker_idx}`` is replaced; default ``collector_profile_{worker_idx}.json``, made
        absolute here: on another node it is that node's path), or to ``on_trace_ready(prof)``
        in the actor. Call it before iterating.

        Example:
            >>> c.enable_profile(num_rollouts=4, save_path="/tmp/trace_{worker_idx}.json")  # doctest: +SKIP
        """
        self._check_open()
        if self._iter > 0:
            raise RuntimeError("Cannot enable profiling after iteration has started: call "
                               "enable_profile() before iterating.")
        if int(num_rollouts) <= int(warmup_rollouts) or int(warmup_rollouts) < 0:
            raise ValueError(f"num_rollouts ({num_rollouts}) must exceed warmup_rollouts "
                             f"({warmup_rollouts}) >= 0: nothing would be recorded.")
        workers = [0] if workers is None else [int(w) for w in workers]
        bad = [w for w in workers if not 0 <= w < self.num_workers]
        if bad:
            raise ValueError(f"workers {bad} out of range: this collector has workers "
                             f"0..{self.num_workers - 1}.")
        wrong = [a for a in (activities or []) if a not in ("cpu", "cuda")]
        if wrong:
            raise ValueError(f"activities must be 'cpu' and/or 'cuda'; got {wrong}.")
        import os

        from actors.stepping.profiling import DEFAULT_PATH

        config = dict(num_rollouts=int(num_rollouts), warmup_rollouts=int(warmup_rollouts),
                      save_path=os.path.abspath(save_path or DEFAULT_PATH),
                      activities=activities, record_shapes=record_shapes,
                      profile_memory=profile_memory, with_stack=with_stack,
                      with_flops=with_flops, on_trace_ready=on_trace_ready)
        self._route.settled()
        _ray_get(self._driver.call_workers.remote({w: ("enable_profile", (config,))
                                                   for w in workers}), timeout=CONTROL_TIMEOUT_S)
        self.profile_config = SimpleNamespace(workers=workers, **config)

    def disable_profile(self) -> None:
        """Stop profiling (a trace not written yet is dropped); ``profile_config`` is None."""
        self._check_open()
        if self.profile_config is not None:
            _ray_get(self._driver.call_workers.remote(
                {w: ("disable_profile", ()) for w in self.profile_config.workers}),
                timeout=CONTROL_TIMEOUT_S)
        self.profile_config = None

    def update_policy_weights_(self, policy_or_weights=None, *, worker_ids=None,
                               weights_dict=None, model_id=None) -> None:
        """Send new weights to the workers: through shared memory when they all run on this
        node (written once, each worker copies it in before its next batch), else once through
        Ray's object store.

        With no argument the weights are read from the policy object given at construction.
        Accepts an ``nn.Module``, a TensorDict of parameters (``TensorDict.from_module``) or a
        state dict. ``worker_ids`` (an int or a list) limits the update to those workers. Every
        frame collected afterwards records the new ``policy_version``.
        """
        self._check_open()
        if model_id not in (None, "policy"):
            raise NotImplementedError(
                f"model_id={model_id!r}: only the collector's own policy ('policy') has weights "
                "to update here.")
        if weights_dict is not None and policy_or_weights is not None:
            raise TypeError("pass policy_or_weights or weights_dict, not both.")
        if self.policy_kind == "random" and policy_or_weights is None and weights_dict is None:
            return
        source = weights_dict if weights_dict is not None else policy_or_weights
        if isinstance(source, dict) and source and all(
                isinstance(k, int) and not isinstance(k, bool) for k in source):
            if worker_ids is not None:  # {worker: weights}, as TorchRL's per-worker updates
                raise TypeError("weights given per worker ({worker: weights}) name their workers: "
                                "drop worker_ids.")
            for worker, per_worker in source.items():
                self.update_policy_weights_(per_worker, worker_ids=[worker])
            return
        if isinstance(worker_ids, int) and not isinstance(worker_ids, bool):
            worker_ids = [worker_ids]
        if worker_ids is not None:
            worker_ids = [int(w) for w in worker_ids]
            bad = [w for w in worker_ids if not 0 <= w < self.num_workers]
            if bad:
                raise ValueError(f"worker_ids {bad} out of range: this collector has workers "
                                 f"0..{self.num_workers - 1}.")
        # the board holds one set of weights: weights for some workers only go to them through
        # the object store, or the next write would overwrite them before they were read
        everyone = worker_ids is None or set(worker_ids) == set(range(self.num_workers))
        board = self._route is not None and self._route.board is not None and everyone
        # the board copies the tensors itself: no clone for it
        weights = self._state_dict_from(source, copy=not board)
        with self._weights_lock:
            if self._watcher is not None and policy_or_weights is None and weights_dict is None \
                    and worker_ids is None:
                self._watcher.mark_current()
            elif self._watcher is not None:  # weights from elsewhere, or for some workers
                self._watcher.workers_have_it = False
            self.policy_version += 1
            if board and self._route.push(weights, self.policy_version, worker_ids):
                return  # in shared memory: each worker copies it in before its next batch
            ref = ray.put(weights)
            self._route.settled()  # (the driver's policy-lag figures follow the order of events)
            _ray_get(self._driver.set_weights.remote([ref], self.policy_version, worker_ids), timeout=CONTROL_TIMEOUT_S)

    def _first_batch(self) -> None:
        """Before the first batch: the clock starts and, without ``seed``, the env actors'
        torch RNGs are seeded from this process's, so a ``torch.manual_seed`` here makes their
        random actions and sampling policies reproducible (TorchRL's policy draws from this
        process's RNG)."""
        self._t_start = time.perf_counter()
        if self.options.seed is None and (self.policy_kind != "random" or self.spec.get("torchrl")):
            base = int(torch.randint(0, 2**31 - 1, ()).item())  # (replacements are seeded too)
            _ray_get(self._driver.seed_torch.remote(base), timeout=CONTROL_TIMEOUT_S)

    def _sync_if_changed(self) -> None:
        """Automatic weight sync: send the policy's weights if the trainer changed them."""
        if self._watcher is not None:
            with self._weights_lock:
                if self._watcher.changed():
                    self.update_policy_weights_()

    def _sync_loop(self) -> None:
        """During ``start()``: watch the trainer's policy and send changed weights."""
        while not self._sync_stop.wait(AUTO_SYNC_POLL_S):
            try:
                self._sync_if_changed()
            except Exception:  # noqa: BLE001 - the collector is closing; nothing to sync into
                return

    def _state_dict_from(self, source, copy: bool = True) -> dict:
        """The weights to send, checked against the policy; detached CPU clones with ``copy``,
        else the tensors themselves (any device)."""
        if source is None:
            if self.policy is None:
                raise TypeError("this collector's policy is built by policy_factory inside the env "
                                "actors: pass the weights, update_policy_weights_(weights).")
            source = self.policy
        if source is self._reference_policy and isinstance(source, torch.nn.Module):
            # the policy itself: its keys and shapes are the reference
            sd = self._watcher.state() if self._watcher is not None else source.state_dict()
            return {k: v.detach().to("cpu").clone() for k, v in sd.items()} if copy else sd
        if isinstance(source, torch.nn.Module):
            sd = source.state_dict()
        elif hasattr(source, "flatten_keys"):  # a TensorDict of parameters
            sd = {k: v for k, v in source.flatten_keys(".").items()}
        elif isinstance(source, dict):
            sd = source
        else:
            raise TypeError(
                f"update_policy_weights_ takes an nn.Module, a TensorDict or a state dict; "
                f"got {type(source).__name__}.")
        if not isinstance(self._reference_policy, torch.nn.Module):
            raise TypeError("weights can only be updated when the policy is a torch.nn.Module.")
        ref_sd = self._reference_policy.state_dict()
        sd = {k: (v.data if isinstance(v, torch.nn.Parameter) else v) for k, v in sd.items()}
        missing = sorted(set(ref_sd) - set(sd))
        unexpected = sorted(set(sd) - set(ref_sd))
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the policy: missing keys {missing[:5]}, unexpected keys "
                f"{unexpected[:5]}. Pass the policy's own state_dict().")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(ref_sd[k].shape):
                raise ValueError(
                    f"weight {k!r}: expected shape {tuple(ref_sd[k].shape)}, got {tuple(v.shape)}.")
        if not copy:
            return sd
        return {k: v.detach().to("cpu").clone() for k, v in sd.items()}

    def state_dict(self) -> dict:
        self._check_open()
        self._route.settled()
        self._sync_if_changed()  # the actors' policy_state_dict: the weights as they are now
        workers = _ray_get(self._driver.broadcast.remote("state_dict"), timeout=CONTROL_TIMEOUT_S)
        if self._watcher is not None and self._watcher.differs(
                [w.get("policy_state_dict") for w in workers]):  # ``p.data`` edits: send them
            self.update_policy_weights_()
            workers = _ray_get(self._driver.broadcast.remote("state_dict"), timeout=CONTROL_TIMEOUT_S)
        out = {"frames": self._frames, "iter": self._iter, "policy_version": self.policy_version}
        out.update({f"worker{i}": w for i, w in enumerate(workers)})  # TorchRL's layout
        if not self._multi and "env_state_dict" in workers[0]:
            out["env_state_dict"] = workers[0]["env_state_dict"]
        if isinstance(self.policy, torch.nn.Module):
            out["policy_state_dict"] = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        self._check_open()
        self._frames = int(state.get("frames", 0))
        self._iter = int(state.get("iter", 0))
        if "policy_state_dict" in state and isinstance(self.policy, torch.nn.Module):
            self.policy.load_state_dict(state["policy_state_dict"])
            self.update_policy_weights_()
        self.policy_version = max(self.policy_version, int(state.get("policy_version", 0)))
        workers = [state[f"worker{i}"] for i in range(len(state)) if f"worker{i}" in state]
        if workers:
            handles = ray.get(self._driver.worker_handles.remote(), timeout=CONTROL_TIMEOUT_S)
            ray.get([h.load_state_dict.remote(s) for h, s in zip(handles, workers)],
                    timeout=CONTROL_TIMEOUT_S)
