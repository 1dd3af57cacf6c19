"""Ray-side bodies of ray-collectors: plain classes, made remote where they are created.

Internal: the public API is ``collectors``, which re-exports what users need (the errors,
``CollectorOptions``). Nothing here imports ``collectors``; the env worker keeps its imports lean
(no tensordict unless the policy needs it) so that an actor starts fast.
"""
__all__: list[str] = []
