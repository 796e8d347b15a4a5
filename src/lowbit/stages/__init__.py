"""The stages: one per technique, registered for its config type (see ``base``)."""

from lowbit.stages import cluster, int8, mixed, prune, weight_only  # noqa: F401  (registration)
