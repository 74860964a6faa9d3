"""Launch plans: how the worker processes start (ARCHITECTURE §8)."""
