"""Domain errors, as a tree::

    GatewayError
    ├── NotFound        an unknown tenant or key prefix
    ├── Conflict        a duplicate name
    └── InvalidInput    a value out of range or malformed

Entry points map them: the CLI to one-line messages, the services to HTTP.
"""

from __future__ import annotations

__all__ = ["Conflict", "GatewayError", "InvalidInput", "NotFound"]


class GatewayError(Exception):
    """Base of the domain's expected failures; the message is safe to show."""


class NotFound(GatewayError):
    """The named tenant or key does not exist."""


class Conflict(GatewayError):
    """The name is already taken."""


class InvalidInput(GatewayError):
    """A value is out of range or malformed."""
