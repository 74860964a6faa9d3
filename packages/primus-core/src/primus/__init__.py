"""Primus: one experiment file, one command, four training backends.

Importing this package is cheap on purpose: the CLI must start fast and must never pull in
torch, jax or a training framework before a run needs it.
"""

__version__ = "0.1.0"
