"""Core presets (package data): module_base.yaml and the neutral model presets under models/."""
