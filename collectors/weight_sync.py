"""Noticing that the trainer changed the policy, so the workers get the new weights unasked.

TorchRL's single-process ``Collector`` runs the trainer's own policy object, and its
multiprocess collectors keep CPU weights in shared memory: a trainer never has to call
``update_policy_weights_()``. Here the workers hold copies, so the collector compares a
fingerprint of the policy's tensors (version counter and storage of every parameter and buffer)
before each batch and sends the weights when it changed: in-place optimizer steps,
``load_state_dict``, an annealed buffer such as ``EGreedyModule``'s eps, or a swapped tensor.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> watcher = WeightWatcher(net)
    >>> watcher.changed()
    False
    >>> with torch.no_grad():
    ...     _ = net.weight.mul_(2)
    >>> watcher.changed(), watcher.changed()
    (True, False)
"""
from __future__ import annotations

import torch

_registrations = [0]  # parameters and buffers (re)assigned on any module since import


def _registered(*_args):
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_buffer_registration_hook(_registered)
torch.nn.modules.module.register_module_module_registration_hook(_registered)


class WeightWatcher:
    """``changed()`` is True once after each change of ``module``'s parameters or buffers.

    The module's tensors are listed once and again only after a parameter, buffer or submodule
    was assigned somewhere (torch's registration hooks say so), so a check costs a few
    microseconds."""

    def __init__(self, module):
        self.module = module
        self._tensors: list = []
        self._state: dict = {}
        self._ptrs: tuple = ()
        self._listed_at = -1
        self.last = self.fingerprint()
        self.workers_have_it = True  # the workers' weights are this module's (none sent from elsewhere)

    def _relist(self) -> None:
        if self._listed_at != _registrations[0]:
            self._listed_at = _registrations[0]
            self._tensors = [*self.module.parameters(), *self.module.buffers()]
            self._state = self.module.state_dict()
            self._ptrs = tuple(t.data_ptr() for t in self._tensors)

    def fingerprint(self) -> tuple:
        self._relist()
        return tuple((t._version, t.data_ptr()) for t in self._tensors)

    def state(self) -> dict:
        """``module.state_dict()`` (its tensors share the module's storage), listed again only
        after an assignment, like the fingerprint."""
        self._relist()
        if tuple(t.data_ptr() for t in self._tensors) != self._ptrs:  # ``p.data = ...``
            self._listed_at = -1
            self._relist()
        return self._state

    def changed(self) -> bool:
        now = self.fingerprint()
        if now == self.last:
            return False
        self.last = now
        return True

    def mark_current(self) -> None:
        """The workers have the weights as they are now (an explicit update was sent)."""
        self.last = self.fingerprint()
        self.workers_have_it = True

    def differs(self, reported: list) -> bool:
        """Whether workers that all report the same weights (``[{name: tensor}]``) hold other
        values than the module's now, having been sent only the module's: edits through
        ``p.data`` change values without a version bump, which :meth:`changed` cannot see."""
        if not self.workers_have_it or not reported or any(not r for r in reported):
            return False
        first, now = reported[0], self.state()
        if any(r.keys() != first.keys() or not all(torch.equal(r[k], first[k]) for k in r)
               for r in reported[1:]):
            return False  # different weights per worker: sent to some workers on purpose
        return any(k in now and not torch.equal(v, now[k].detach().cpu()) for k, v in first.items())
