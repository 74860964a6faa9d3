"""Generated documentation (docs/backends/*.md)."""
