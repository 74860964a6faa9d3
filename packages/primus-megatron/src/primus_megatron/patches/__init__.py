"""Primus's Megatron patch layer: every change to megatron-core is a registered, reversible Patch.

`PATCHES` is read by core (`primus patches --backend megatron`, the generated docs, each worker).
Platform patches let megatron-core train on CPU; feature patches are upstream Primus's flags.
"""

from primus_megatron.patches.cpu import CPU_PATCHES
from primus_megatron.patches.features import FEATURE_PATCHES

PATCHES = [*CPU_PATCHES, *FEATURE_PATCHES]
