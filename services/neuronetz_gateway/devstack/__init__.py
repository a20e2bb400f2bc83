"""The local development stack behind ``neuronetz-gateway dev``.

``servers`` starts throwaway Postgres/Redis (shared with the test harness),
``processes`` runs and stops child processes, ``caddyfile`` finds the
Caddyfile, and ``stack`` puts them together.
"""

from neuronetz_gateway.devstack.stack import DevStack, DevStackOptions, StackInfo

__all__ = ["DevStack", "DevStackOptions", "StackInfo"]
