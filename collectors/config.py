"""Deployment configs: where Ray runs and what each actor asks for. Same keys local and cluster.

``load_config(None)`` gives ``configs/local.yaml``'s semantics; a path, a dict or a
:class:`DeploymentConfig` is validated with pydantic (unknown keys and wrong types are rejected
with the key's name).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from collectors.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RayInit(_Strict):
    address: Optional[str] = None  # None/"local": start or reuse a local Ray; "auto"; host:port; ray://
    num_cpus: Optional[float] = Field(default=None, ge=0)
    dashboard_host: str = "127.0.0.1"  # where a local Ray's dashboard listens
    allow_public_dashboard: bool = False  # required for a dashboard_host beyond this machine
    dashboard_port: Optional[int] = None
    runtime_env: Optional[dict] = None

    @model_validator(mode="after")
    def _dashboard(self):
        if self.dashboard_host not in LOOPBACK and not self.allow_public_dashboard:
            raise ValueError(
                f"dashboard_host {self.dashboard_host!r} would expose the Ray dashboard (and its "
                "job API) beyond this machine; keep 127.0.0.1, or set "
                "ray.allow_public_dashboard: true to mean it")
        return self


class ActorResources(_Strict):
    num_cpus: float = Field(default=0.25, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    memory: Optional[int] = Field(default=None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    node: Optional[str] = None  # pin to a node id (NodeAffinity); mainly for the replay buffer

    def options(self) -> dict:
        out: dict = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            out["num_gpus"] = self.num_gpus
        if self.memory:
            out["memory"] = self.memory
        if self.resources:
            out["resources"] = dict(self.resources)
        if self.node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            out["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node, soft=False)
        return out


class Resources(_Strict):
    env_worker: ActorResources = Field(default_factory=ActorResources)
    driver: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=0))
    replay_buffer: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=0.25))


class Placement(_Strict):
    strategy: Optional[Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]] = None
    timeout_s: float = Field(default=30.0, gt=0)
    # replay shards (RayReplayBuffer(num_shards=N)): one per node, or all on the caller's node;
    # None: per_node when several nodes can hold one, else local
    shards: Optional[Literal["per_node", "local"]] = None


class DeploymentConfig(_Strict):
    ray: RayInit = Field(default_factory=RayInit)
    resources: Resources = Field(default_factory=Resources)
    placement: Placement = Field(default_factory=Placement)
    job: Optional[dict] = None  # an example job (env, policy, collector, frames); see cli
    train: Optional[dict] = None  # hyperparameters of the training examples in scripts/

    @field_validator("job")
    @classmethod
    def _job_keys(cls, job):
        if job is None:
            return job
        allowed = {"env", "env_kwargs", "policy", "collector", "frames_per_batch", "total_frames",
                   "num_workers", "num_envs", "seed", "replay_buffer", "hidden", "name"}
        unknown = set(job) - allowed
        if unknown:
            raise ValueError(f"unknown job keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return job

    # -- what the collectors ask of it -------------------------------------------------------
    def ray_init_kwargs(self) -> dict:
        address = os.environ.get("RAY_COLLECTORS_ADDRESS") or self.ray.address
        return {"address": address, "num_cpus": self.ray.num_cpus,
                "runtime_env": _resolve_runtime_env(self.ray.runtime_env),
                "dashboard_port": self.ray.dashboard_port,
                "dashboard_host": self.ray.dashboard_host}

    def worker_options(self, num_cpus=None, num_gpus=None, resources=None) -> dict:
        opts = self.resources.env_worker.options()
        if num_cpus is not None:
            opts["num_cpus"] = num_cpus
        if num_gpus is not None:
            opts["num_gpus"] = num_gpus
        if resources is not None:
            opts["resources"] = dict(resources)
        return opts

    def driver_options(self) -> dict:
        """Ray options of the driver actor (it mostly waits: ``num_cpus: 0`` by default)."""
        return self.resources.driver.options()

    def placement_options(self) -> dict:
        """How the driver places the env actors (a placement group when ``strategy`` is set)."""
        return {"strategy": self.placement.strategy, "timeout_s": self.placement.timeout_s}


def _resolve_runtime_env(env: dict | None) -> dict | None:
    """``py_modules: [collectors, actors]`` names our packages wherever they are installed."""
    if not env or "py_modules" not in env:
        return env
    ours = {"collectors": CONFIG_DIR.parent / "collectors", "actors": CONFIG_DIR.parent / "actors"}
    env = dict(env)
    env["py_modules"] = [str(ours[m]) if m in ours else m for m in env["py_modules"]]
    return env


def load_config(config=None) -> DeploymentConfig:
    """A validated :class:`DeploymentConfig` from ``None``, a path, a dict or a config."""
    if isinstance(config, DeploymentConfig):
        return config
    source = "the default (configs/local.yaml semantics)"
    if config is None:
        data: dict = {}
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.exists() and (CONFIG_DIR / path).exists():
            path = CONFIG_DIR / path
        if not path.exists():
            raise ConfigError(f"config file {str(config)!r} does not exist.")
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        source = str(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}.")
    elif isinstance(config, dict):
        data = config
        source = "the config dict"
    else:
        raise ConfigError(f"config must be a path, a dict or a DeploymentConfig; got {type(config).__name__}.")
    try:
        return DeploymentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config in {source}: {problems}") from None
