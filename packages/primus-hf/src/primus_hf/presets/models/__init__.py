"""Backend-native model presets of the hf backend (`model: {hf_path: ...}` style)."""
