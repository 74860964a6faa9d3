"""A run: its directory, logging, metrics stream and the worker entry that trains."""
