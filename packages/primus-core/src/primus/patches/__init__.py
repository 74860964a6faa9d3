"""The patch layer: small, versioned, reversible changes to a framework (ARCHITECTURE §5)."""

from primus.patches.registry import PHASES, Patch, PatchContext, PatchDecision, PatchSet

__all__ = ["PHASES", "Patch", "PatchContext", "PatchDecision", "PatchSet"]
