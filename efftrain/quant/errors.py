"""The error of a PTQ request that cannot be carried out (the sweep, recovery rows and the grid raise
it; the CLI prints its one-line message)."""


class PTQError(ValueError):
    """A PTQ request that cannot be carried out; the message names the problem."""
