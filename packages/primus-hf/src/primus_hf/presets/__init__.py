"""Module presets of the hf backend (package data, read with importlib.resources)."""
