"""Shared memory between the trainer and the actors of its node: private folders
(``folders``), the policy's weights (``weight_board``) and the batch hand-off (``handoff``)."""
