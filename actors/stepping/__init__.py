"""Rollout loops: the env actor (``env_worker``) and the loops it runs, gymnasium envs
(``rollout``), native vector envs (``vector_rollout``) and TorchRL envs (``td_rollout``), with
the batch layout they share (``batch_layout``), how a policy is called (``policy_runner``),
space checks (``spaces``) and compact batches (``compact``)."""
