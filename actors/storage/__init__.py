"""Replay storage: the buffer actor (``replay_buffer``, its checkpoints in ``buffer_state`` and
``checkpoints``), the shared-memory ring, the samplers and their sum tree, and compact storage
(``compact_storage`` for next observations, ``frame_stacks`` for stacked frames, both keeping
what they cannot rebuild in a ``side_store``)."""
