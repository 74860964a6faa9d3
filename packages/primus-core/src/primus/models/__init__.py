"""Neutral model descriptions that every backend translates to its own keys."""
