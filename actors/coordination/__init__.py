"""Coordination: the driver actor (``driver``) and its parts, the worker pool (spawn, place,
replace), the collection (sync rounds, async stream, the ledger), the background writer into a
replay buffer, the restart budget and the metrics."""
