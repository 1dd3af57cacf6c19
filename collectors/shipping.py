"""Ship user code that env actors cannot import (test files, notebooks' helper modules).

Ray pickles functions and classes by reference to their module; a module that is not on the
workers' path (a test file under ``tests/``, a script's sibling module) then fails to import in
the actor. Such modules are registered with cloudpickle to be shipped by value instead.
"""
from __future__ import annotations

import functools
import os
import sys
import sysconfig

from ray import cloudpickle

_INSTALLED = tuple(
    os.path.realpath(p) for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)
_OURS = ("collectors", "actors")


def _module_names(obj, seen: set) -> set[str]:
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    names = set()
    if isinstance(obj, functools.partial):
        names |= _module_names(obj.func, seen)
        for value in (*obj.args, *obj.keywords.values()):
            names |= _module_names(value, seen)
        return names
    if isinstance(obj, (list, tuple)):
        for value in obj:
            names |= _module_names(value, seen)
        return names
    if isinstance(obj, dict):
        for value in obj.values():
            names |= _module_names(value, seen)
        return names
    for attr in ("create_env_fn", "env_fn"):  # TorchRL's EnvCreator, SerialEnv, ParallelEnv...
        # (read from the instance: a batched env's __getattr__ recurses before it starts)
        inner = None if isinstance(obj, type) else getattr(obj, "__dict__", {}).get(attr)
        if isinstance(inner, (list, tuple)) or (callable(inner) and inner is not obj):
            names |= _module_names(inner, seen)
    modules = getattr(obj, "modules", None)
    if callable(modules) and hasattr(obj, "parameters"):  # an nn.Module: every submodule's class
        try:
            for sub in obj.modules():
                names.add(type(sub).__module__)
                for value in vars(sub).values():
                    if callable(value) and not hasattr(value, "parameters"):
                        names |= _module_names(value, seen)
        except Exception:  # noqa: BLE001
            pass
    for candidate in (obj, type(obj)):
        name = getattr(candidate, "__module__", None)
        if isinstance(name, str):
            names.add(name)
    return names


def _is_user_module(name: str) -> bool:
    if name in ("__main__", "builtins") or name.split(".")[0] in _OURS:
        return False  # __main__ already goes by value; our packages are installed
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if module is None or not path:
        return False
    if os.path.realpath(path).startswith(_INSTALLED):
        return False
    return not _on_inherited_path(name.split(".")[0])


def _on_inherited_path(top: str) -> bool:
    """Whether the top-level package ``top`` lies in a directory of ``PYTHONPATH`` (env actors
    inherit it: ``pip install --target`` folders, a checkout on the path), or belongs to an
    installed distribution (editable installs). Such packages are imported by name in the
    actors; shipping them by value would copy a library (and can fail: locks in its classes)."""
    module = sys.modules.get(top)
    where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
    if where is None:
        return False
    where = os.path.realpath(where)
    parent = os.path.dirname(os.path.dirname(where) if os.path.basename(where) == "__init__.py"
                             else where)
    inherited = {os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    return parent in inherited or top in _distributions()


@functools.lru_cache(maxsize=1)
def _distributions() -> frozenset:
    """Top-level names of installed distributions, without the names that some wheels ship by
    mistake and that user code uses too."""
    import importlib.metadata

    return frozenset(importlib.metadata.packages_distributions()) - {
        "tests", "test", "scripts", "examples", "benchmarks", "docs"}


def ship_by_value(*objs) -> list[str]:
    """Register the user modules that ``objs`` come from to be pickled by value."""
    names = set()
    for obj in objs:
        names |= _module_names(obj, set())
    shipped = sorted(n for n in names if _is_user_module(n))
    picklers = [cloudpickle]
    try:  # TorchRL's EnvCreator pickles its factory with the standalone cloudpickle
        import cloudpickle as standalone

        picklers.append(standalone)
    except ImportError:
        pass
    for name in shipped:
        for pickler in picklers:
            try:
                pickler.register_pickle_by_value(sys.modules[name])
            except (ValueError, TypeError):
                pass
    return shipped
