"""Experiment configuration: YAML loading, schema, resolution layers and provenance."""
