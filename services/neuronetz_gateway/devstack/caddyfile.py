"""Where the dev stack finds the Caddyfile.

``caddy/Caddyfile`` in the repository is the source of truth. A checkout (or
an editable install) uses it directly; an installed wheel has no repository,
so the package ships a byte-identical copy (``devstack/Caddyfile``; a unit
test keeps the two equal).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PACKAGED_CADDYFILE", "REPOSITORY_CADDYFILE", "locate_caddyfile"]

_PACKAGE_DIR = Path(__file__).resolve().parent
#: ``<repo>/caddy/Caddyfile`` when this package sits in ``<repo>/services/``.
REPOSITORY_CADDYFILE = _PACKAGE_DIR.parents[2] / "caddy" / "Caddyfile"
PACKAGED_CADDYFILE = _PACKAGE_DIR / "Caddyfile"


def locate_caddyfile(explicit: Path | None = None) -> Path:
    """The operator's file if given, else the repository's, else the packaged copy."""
    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"no Caddyfile at {explicit}")
        return explicit
    for candidate in (REPOSITORY_CADDYFILE, PACKAGED_CADDYFILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(  # pragma: no cover - the package always ships its copy
        f"no Caddyfile at {REPOSITORY_CADDYFILE} or {PACKAGED_CADDYFILE}"
    )
