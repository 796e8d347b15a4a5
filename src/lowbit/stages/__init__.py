"""The stages: one per technique, registered for its config type (see ``base``)."""

from lowbit.stages import cluster, distill, int8, mixed, prune, qat, weight_only  # noqa: F401  (registration)
