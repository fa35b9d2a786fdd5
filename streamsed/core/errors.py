"""Errors a user can fix, shared by every command (sans-I/O)."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error the user can fix; ``streamsed`` prints it as one line and exits with status 2."""
