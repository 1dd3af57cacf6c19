"""``CollectorOptions``: every collector option, defined once with its default, check and meaning.

The collector's constructor builds one from its keyword arguments; the driver, the env workers
and the rollout receive it (without the trainer-side fields, see :meth:`for_workers`).
``help(SyncDataCollector)`` lists these fields, generated from the descriptions below.

Example:
    >>> from actors.options import CollectorOptions
    >>> CollectorOptions(frames_per_batch=200, check_finite=True).check_finite
    'raise'
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator,
                      model_validator)

EXPLORATION_TYPES = ("random", "deterministic", "mode", "mean", "median")
TRAINER_ONLY = ("postproc", "replay_buffer", "config", "policy_factory", "pre_collect_hook",
                "post_collect_hook")  # never sent to the actors in the options


def check_integer(name: str, value, minimum: int | None = None):
    """An int (numpy integers too, never a bool or a float) not below ``minimum``."""
    if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu" and getattr(value, "ndim", 0) == 0:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return value


def check_number(name: str, value, *, positive: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive; got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0; got {value!r}")
    return float(value)


class CollectorOptions(BaseModel):
    """All options of a collector. Unknown names are refused; every value is checked here."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    # -- what to collect ---------------------------------------------------------------------
    frames_per_batch: int = Field(
        description="frames per batch, over all envs and workers; rounded up to a multiple of "
                    "num_envs (and of num_workers for MultiSync), reported in stats()")
    total_frames: int = Field(
        -1, description="frames to collect before iteration stops, rounded up to whole batches; "
                        "-1 (or float('inf')) collects forever")
    num_envs: int = Field(1, description="envs stepped by each env actor; batches get an env "
                                         "dimension [num_envs, T] when above 1")
    num_workers: int = Field(1, description="env actors (multi collectors only)")
    create_env_kwargs: Union[dict, list, tuple, None] = Field(
        None, description="keyword arguments for create_env_fn, or a list of them, one per worker")
    max_frames_per_traj: Optional[int] = Field(
        None, description="truncate episodes after this many steps and record step_count; "
                          "None, 0 or -1: no limit")
    init_random_frames: int = Field(
        0, description="the first frames use uniformly random actions instead of the policy "
                       "(None, 0 or -1: none)")
    reset_at_each_iter: StrictBool = Field(
        False, description="start fresh episodes in every env at the start of each batch")
    split_trajs: StrictBool = Field(
        False, description="yield [n_traj, max_len] batches padded with zeros, with "
                           "('collector', 'mask')")
    trajs_per_batch: Optional[int] = Field(
        None, description="yield batches of this many complete trajectories instead of frame "
                          "batches (TorchRL's option); with a replay buffer in this process each "
                          "complete trajectory is written flat and unfinished ones are held back")
    traj_format: Optional[Literal["padded", "cat"]] = Field(
        None, description="with trajs_per_batch: 'padded' gives [N, max_len] zero-padded, with "
                          "('collector', 'mask'); 'cat' puts them end to end, [sum T_i]; None "
                          "is 'padded' (with TorchRL's FutureWarning)")
    trajs_per_write: Optional[int] = Field(
        None, description="with trajs_per_batch and a replay buffer: complete trajectories per "
                          "extend() call (None: all that are ready)")
    postproc: Optional[Callable] = Field(None, description="called on each batch before it is "
                                                           "yielded (trainer side)")
    seed: Optional[int] = Field(None, description="env i of the run is seeded seed + i; the "
                                                  "policy's RNG is seeded too. Unset: each env actor's torch RNG is "
                                                  "seeded from your process's at the first batch (torch.manual_seed)")
    set_truncated: StrictBool = Field(
        False, description="mark the last step of each batch row truncated (and done)")
    replay_buffer: Any = Field(
        None, description="a RayReplayBuffer (batches go straight to its actor, iteration "
                          "yields None) or any object with extend() (extended in the trainer)")
    update_at_each_batch: StrictBool = Field(
        False, description="call update_policy_weights_() before every batch")
    preemptive_threshold: Optional[float] = Field(
        None, description="MultiSync only: once this fraction of workers delivered, the others "
                          "stop early; unfilled frames have traj id -1")
    cat_results: Union[Literal["stack", "cat"], int, None] = Field(
        None, description="MultiSync only: 'stack' gives [num_workers, ...]; -1 or 'cat' "
                          "concatenates along time, 0 along the first dim. None: 'stack'")
    auto_sync_weights: StrictBool = Field(
        True, description="send the policy's weights to the workers before a batch whenever its "
                          "parameters or buffers changed in the trainer (as TorchRL's shared "
                          "weights do); False: only update_policy_weights_() sends them")
    exploration_type: str = Field(
        "random", description="tensordict interaction type set around every policy call "
                              "('random', 'deterministic', 'mode', 'mean', 'median'; "
                              "ExplorationType members too); TorchRL's default is random")
    native_vector: Optional[StrictBool] = Field(
        None, description="step a gymnasium id that has a native vectorized implementation "
                          "(gymnasium.make_vec(id, num_envs, vectorization_mode="
                          "'vector_entry_point'), e.g. CartPole) as one vector env: None uses it "
                          "from 16 envs per actor (where it is faster) if the options allow, "
                          "True requires it, False never")
    shared_memory: Optional[StrictBool] = Field(
        None, description="when every env actor runs on the trainer's node (x86 Linux with "
                          "/dev/shm): weights go to the actors through one shared-memory copy "
                          "(each copies a change in before its next batch), and sync "
                          "collectors' batches come back through a shared-memory slot per actor "
                          "with blocking wake-ups (no Ray call per batch; the driver still "
                          "keeps the ledger and handles failures). None: where possible (for "
                          "batches: a sync collector, not during start(), no RayReplayBuffer, "
                          "no preemptive_threshold); True: require it for batches and weights "
                          "(refused where it cannot apply); False: never (Ray calls and the "
                          "object store)")
    compact_obs: StrictBool = Field(
        False, description="store each observation once (TorchRL's option): yielded batches "
                           "leave out the ('next', obs) copies of observation and state keys; "
                           "with a RayReplayBuffer, that buffer must have compact_obs=True and "
                           "keeps episode-final observations apart")
    track_traj_ids: StrictBool = Field(
        True, description="record ('collector', 'traj_ids'); False leaves the key out of the "
                          "yielded batches (TorchRL's option)")
    worker_idx: Optional[int] = Field(
        None, description="TorchRL's: this collector's index among several collectors "
                                "(kept as the collector's worker_idx attribute, nothing else)")
    extend_buffer: StrictBool = Field(
        True, description="TorchRL's option (deprecated there): False writes a replay buffer in "
                          "the trainer's process step by step (rb.add of each time step, in time "
                          "order) instead of one extend per batch; not with postproc, split_trajs, "
                          "return_same_td or a RayReplayBuffer")
    return_same_td: StrictBool = Field(
        False, description="TorchRL's option: every batch is written into the TensorDict the "
                           "previous one was (same object, same storage); keep a batch across "
                           "iterations only as a clone()")
    num_threads: Optional[int] = Field(
        None, description="torch threads of the trainer's process from construction; None: "
                          "multi and async collectors take one off per local env actor")
    num_sub_threads: int = Field(1, description="torch threads in each env actor")
    auto_register_policy_transforms: Optional[StrictBool] = Field(
        None, description="TorchRL envs: True appends the transforms the policy needs and the "
                          "env lacks (InitTracker, a recurrent module's primer), as TorchRL 0.15 "
                          "does by default; None or False leave the env as it is")
    track_policy_version: StrictBool = Field(
        False, description="also write the version as TorchRL's 'policy_version' entries (root "
                           "and next); ('collector', 'policy_version') is always recorded")
    policy_factory: Union[Callable, list, tuple, None] = Field(
        None, description="a zero-argument callable building the policy inside each env actor "
                          "(for policies that cannot be pickled), or a list of them, one per "
                          "worker; instead of policy")
    compile_policy: Union[StrictBool, dict, None] = Field(
        None, description="torch.compile the policy inside each env actor: True, or a dict of "
                          "torch.compile keyword arguments")
    init_fn: Optional[Callable] = Field(
        None, description="called with no argument in each env actor before it builds its envs")
    pre_collect_hook: Optional[Callable] = Field(
        None, description="called with no argument before each batch is collected (trainer side)")
    post_collect_hook: Optional[Callable] = Field(
        None, description="called with each batch before it is yielded (trainer side)")
    # -- devices -------------------------------------------------------------------------------
    device: Optional[str] = Field(
        None, description="default for policy_device and storing_device ('cpu' or 'cuda[:i]')")
    policy_device: Optional[str] = Field(
        None, description="device the policy runs on inside each env actor (default: the "
                          "device of the policy's weights, as TorchRL); a CUDA device makes each "
                          "actor ask Ray for a GPU, or a share of the cluster's GPUs when there "
                          "are more workers (num_gpus, or the config's "
                          "resources.env_worker.num_gpus, overrides); the actor runs it on the "
                          "GPU Ray gives it")
    env_device: Optional[str] = Field(None, description="the env's data's device: cpu for gymnasium")
    storing_device: Optional[str] = Field(None, description="device of the yielded batches")
    # -- deployment --------------------------------------------------------------------------
    name: Optional[str] = Field(None, description="prefix of the actor names shown in the Ray "
                                                  "dashboard (default: class name + random id)")
    config: Any = Field(None, description="deployment config: a YAML path, a dict or a "
                                          "DeploymentConfig (default: configs/local.yaml)")
    num_cpus: Optional[float] = Field(None, description="CPUs each env actor asks Ray for (default: the config's)")
    num_gpus: Optional[float] = Field(None, description="GPUs each env actor asks Ray for (default: the config's)")
    resources: Optional[dict] = Field(None, description="custom Ray resources each env actor "
                                                        "asks for")
    worker_nice: int = Field(0, description="raise the env actors' OS niceness (0-19) so a "
                                            "trainer on the same cores keeps its share")
    main_thread_sleep_s: Optional[float] = Field(
        None, description="while an env actor serves batches through shared memory, Ray's loop "
                          "on its process's main thread (which wakes every 10 ms) sleeps this "
                          "long at a time, and a Ray call to the actor (get_distant_attr, an "
                          "interruptor's preempt) may wait as long to start; 0: off; None: 0.1 "
                          "for actors given under 0.2 CPU (many per core), else off")
    # -- faults and waits --------------------------------------------------------------------
    sample_timeout_s: Optional[float] = Field(
        None, description="a worker that delivers no batch within this is killed and replaced; "
                          "None (default): adaptive, 10x its slowest batch so far, at least 60 s "
                          "(600 s for its first batch)")
    startup_timeout_s: float = Field(60.0, description="bound on building the envs in a new "
                                                       "worker (and on placing it)")
    max_restarts: int = Field(3, description="failures (worker or env) allowed within "
                                             "restart_window_s before the collector raises")
    restart_window_s: float = Field(60.0, description="the sliding window of max_restarts, "
                                                      "counted in working time (backoff excluded)")
    restart_backoff_s: float = Field(0.0, description="wait before a restart, doubled for each "
                                                      "failure in the window (capped at 30 s)")
    on_worker_error: Literal["restart", "raise"] = Field(
        "restart", description="'restart': rebuild the failed env or worker; 'raise': raise "
                               "CollectorError at the first failure")
    check_finite: Literal["off", "raise", "drop_episode"] = Field(
        "off", description="NaN/inf in a batch: 'raise' (or True) raises EnvSpecError; "
                           "'drop_episode' blanks and masks the episode and counts it")
    check_obs_space: StrictBool = Field(
        False, description="check every observation against the env's observation_space")
    write_timeout_s: float = Field(30.0, description="bound on one write into the buffer actor, retries included")
    prefetch: int = Field(1, description="async collectors: batches each worker may collect ahead of the consumer")

    # -- checks ------------------------------------------------------------------------------
    @field_validator("frames_per_batch", "num_envs", "num_workers", "prefetch",
                     "num_sub_threads", mode="before")
    @classmethod
    def _positive_int(cls, v, info):
        return check_integer(info.field_name, v, 1)

    @field_validator("trajs_per_batch", "trajs_per_write", "num_threads", "worker_idx", "seed",
                     mode="before")
    @classmethod
    def _optional_positive(cls, v, info):
        low = 0 if info.field_name in ("worker_idx", "seed") else 1
        return None if v is None else check_integer(info.field_name, v, low)

    @field_validator("max_restarts", "init_random_frames", mode="before")
    @classmethod
    def _non_negative_int(cls, v, info):
        if info.field_name == "init_random_frames" and (v is None or (type(v) is int and v == -1)):
            return 0  # TorchRL: None and -1 mean none
        return check_integer(info.field_name, v, 0)

    @field_validator("worker_nice", mode="before")
    @classmethod
    def _nice(cls, v):
        if check_integer("worker_nice", v, 0) > 19:
            raise ValueError(f"worker_nice must be in 0..19 (a niceness increment); got {v}")
        return v

    @field_validator("total_frames", mode="before")
    @classmethod
    def _total_frames(cls, v):
        if isinstance(v, float) and math.isinf(v) and v > 0:
            return -1
        v = check_integer("total_frames", v)
        if v == 0 or v < -1:
            raise ValueError(f"total_frames must be positive or -1 (endless); got {v}")
        return v

    @field_validator("max_frames_per_traj", mode="before")
    @classmethod
    def _max_frames(cls, v):  # TorchRL: -1 / 0 mean "no limit"
        return None if v is None or check_integer("max_frames_per_traj", v) <= 0 else v

    @field_validator("split_trajs", mode="before")
    @classmethod
    def _split(cls, v):
        return False if v is None else v  # TorchRL's default is None

    @field_validator("sample_timeout_s", "main_thread_sleep_s", mode="before")
    @classmethod
    def _optional_seconds(cls, v, info):
        if info.field_name == "sample_timeout_s" or v is None:
            return None if v is None else check_number(info.field_name, v, positive=True)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"main_thread_sleep_s must be seconds > 0, 0 (off) or None (auto); got {v!r}")
        return v

    @field_validator("startup_timeout_s", "restart_window_s", "write_timeout_s", mode="before")
    @classmethod
    def _timeout(cls, v, info):
        if v is None:
            raise ValueError(f"{info.field_name} must be a positive number of seconds (nothing "
                             "waits forever); got None")
        return check_number(info.field_name, v, positive=True)

    @field_validator("num_cpus", "num_gpus", "restart_backoff_s", mode="before")
    @classmethod
    def _resource(cls, v, info):
        return None if v is None else check_number(info.field_name, v, positive=False)

    @field_validator("preemptive_threshold", mode="before")
    @classmethod
    def _threshold(cls, v):  # 0: every worker stops after its first step
        if v is not None and check_number("preemptive_threshold", v, positive=False) > 1.0:
            raise ValueError(f"preemptive_threshold must be in [0, 1]; got {v!r}")
        return v

    @field_validator("traj_format", mode="before")
    @classmethod
    def _traj_format(cls, v):
        if v is not None and v not in ("padded", "cat"):
            raise ValueError(f"traj_format must be 'padded' or 'cat'; got {v!r}")
        return v

    @field_validator("check_finite", mode="before")
    @classmethod
    def _check_finite(cls, v):
        if isinstance(v, bool) or v is None:
            return "raise" if v else "off"
        if v not in ("off", "raise", "drop_episode"):
            raise ValueError(f"check_finite must be False, True ('raise') or 'drop_episode'; got {v!r}")
        return v

    @field_validator("cat_results", mode="before")
    @classmethod
    def _cat(cls, v):
        if v in (None, "stack", "cat") or (isinstance(v, int) and not isinstance(v, bool) and v in (-1, 0)):
            return "cat" if v == -1 else v
        raise ValueError(f"cat_results must be 'stack', -1 or 'cat', or 0; got {v!r}")

    @field_validator("exploration_type", mode="before")
    @classmethod
    def _exploration(cls, v):
        name = getattr(v, "value", v)  # tensordict's InteractionType / TorchRL's ExplorationType
        if isinstance(name, str) and name.lower() in EXPLORATION_TYPES:
            return name.lower()
        raise ValueError(f"exploration_type must be one of {EXPLORATION_TYPES} or an "
                         f"ExplorationType member; got {v!r}")

    @field_validator("create_env_kwargs", mode="before")
    @classmethod
    def _env_kwargs(cls, v):
        if isinstance(v, (list, tuple)):
            if not v or not all(isinstance(k, dict) or k is None for k in v):
                raise ValueError(f"create_env_kwargs as a list needs one dict per worker; got {v!r}")
            return tuple(dict(k or {}) for k in v)
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"create_env_kwargs must be a dict (or one per worker); got {v!r}")
        return v

    def env_kwargs(self, worker: int) -> dict | None:
        """Worker ``worker``'s ``create_env_kwargs``."""
        kwargs = self.create_env_kwargs
        return kwargs[worker] if isinstance(kwargs, tuple) else kwargs

    @field_validator("policy_factory", mode="before")
    @classmethod
    def _factories(cls, v):
        if isinstance(v, (list, tuple)):
            if not v or not all(callable(f) for f in v):
                raise ValueError(f"policy_factory as a list needs one callable per worker; got {v!r}")
            return tuple(v)
        if v is not None and not callable(v):
            raise ValueError(f"policy_factory must be callable; got {type(v).__name__}")
        return v

    @field_validator("postproc", "init_fn", "pre_collect_hook",
                     "post_collect_hook", mode="before")
    @classmethod
    def _callable(cls, v, info):
        if v is not None and not callable(v):
            raise ValueError(f"{info.field_name} must be callable; got {type(v).__name__}")
        return v

    @field_validator("device", "policy_device", "env_device", "storing_device", mode="before")
    @classmethod
    def _device(cls, v, info):
        if v is None:
            return None
        import torch

        try:
            device = torch.device(v)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"{info.field_name} must be a torch device such as 'cpu' or "
                             f"'cuda:0'; got {v!r} ({exc})") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{info.field_name}={v!r}: only 'cpu' and 'cuda' devices are supported")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{info.field_name}={v!r} asks for CUDA, but torch sees no CUDA "
                             "device on this machine; use 'cpu' or run where a GPU is visible")
        if info.field_name == "env_device" and device.type != "cpu":
            raise ValueError(f"env_device={v!r}: gymnasium envs produce CPU (numpy) data; use "
                             "'cpu' or leave it None, and set policy_device for the policy")
        return str(device)

    @model_validator(mode="before")
    @classmethod
    def _devices(cls, values):
        """``device`` is the default of ``policy_device`` and ``storing_device``; with neither,
        batches are stored on ``env_device`` when the policy's is the same (as TorchRL)."""
        if isinstance(values, dict) and values.get("device") is not None:
            values = dict(values)
            for key in ("policy_device", "storing_device"):
                if values.get(key) is None:
                    values[key] = values["device"]
        if isinstance(values, dict) and values.get("storing_device") is None and str(
                values.get("env_device")) == str(values.get("policy_device")) != "None":
            values = dict(values, storing_device=values["env_device"])
        return values

    @field_validator("replay_buffer", mode="before")
    @classmethod
    def _buffer(cls, v):
        if v is not None and not hasattr(v, "extend"):
            raise ValueError(f"replay_buffer must be a collectors.RayReplayBuffer or have "
                             f"extend(); got {type(v).__name__}")
        return v

    @field_validator("resources", mode="before")
    @classmethod
    def _resources(cls, v):
        if v is None:
            return None
        if not isinstance(v, dict) or not all(
                isinstance(k, str) and not isinstance(n, bool) and isinstance(n, (int, float)) and n >= 0
                for k, n in v.items()):
            raise ValueError(f"resources must map resource names to amounts >= 0; got {v!r}")
        return dict(v)

    # -- use ---------------------------------------------------------------------------------
    def for_workers(self) -> "CollectorOptions":
        """A copy without the trainer-side fields (``postproc``, ``replay_buffer``, ``config``)."""
        return self.model_copy(update={k: None for k in TRAINER_ONLY})

    @classmethod
    def build(cls, who: str, **values) -> "CollectorOptions":
        """Validate ``values``; a bad one raises ``ValueError`` (or ``TypeError`` for an unknown
        name) that names the value and the fix."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems, unknown = [], []
            for err in exc.errors():
                field = ".".join(map(str, err["loc"])) or "options"
                if err["type"] == "extra_forbidden":
                    unknown.append(field)
                    continue
                msg = err["msg"].removeprefix("Value error, ")
                if field not in msg:
                    msg = f"{field}: {msg}; got {err.get('input')!r}"
                problems.append(msg)
            if unknown:
                raise TypeError(f"{who}() got unexpected keyword argument(s) {unknown}. See "
                                f"help({who}) for the options.") from None
            raise ValueError(f"{who}: " + "; ".join(problems) + ".") from None
