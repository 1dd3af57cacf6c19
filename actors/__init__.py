"""Ray-side bodies of ray-collectors: plain classes, made remote where they are created.

Nothing here imports ``collectors``; the env worker keeps its imports lean (no tensordict
unless the policy needs it) so that an actor starts fast.
"""
