"""Platform detection and the environment registry."""
