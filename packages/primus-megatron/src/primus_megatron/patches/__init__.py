"""Primus's Megatron patch layer: every change to megatron-core is a registered, reversible Patch.

`PATCHES` is read by core (`primus patches --backend megatron`, the generated docs, each worker).
Platform patches let megatron-core train on CPU (cpu.py) and shard its optimizer state or its
parameters (sharding.py); family patches build DeepSeek and Llama 4 without TransformerEngine
(families.py); feature patches are upstream Primus's flags: argument fix-ups,
checkpoints, recompute and memory reports (features.py), the pipeline warm-up and schedule dump
(pipeline.py), and the experiment trackers (trackers.py).
"""

from primus_megatron.patches.cpu import CPU_PATCHES
from primus_megatron.patches.families import FAMILY_PATCHES
from primus_megatron.patches.features import FEATURE_PATCHES
from primus_megatron.patches.pipeline import PIPELINE_PATCHES
from primus_megatron.patches.sharding import SHARDING_PATCHES
from primus_megatron.patches.trackers import TRACKER_PATCHES

PATCHES = [*CPU_PATCHES, *SHARDING_PATCHES, *FAMILY_PATCHES, *FEATURE_PATCHES, *PIPELINE_PATCHES, *TRACKER_PATCHES]
