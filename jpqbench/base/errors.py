"""User-facing errors.

Every problem a user can cause (unknown name, bad budget, missing data, malformed
config/plan/checkpoint) raises :class:`UserError` with a message that names the problem
*and* the fix. The CLI prints it as two lines and exits with status 2, so a user never
sees a traceback from deep inside torch for a mistake in their command line.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported with the fix."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}\n  fix: {fix}")
        self.problem = problem
        self.fix = fix
