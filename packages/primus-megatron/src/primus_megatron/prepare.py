"""`primus data prepare` for Megatron: convert the experiment's corpus to indexed .bin/.idx once."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def prepare(resolved: Any, *, run_dir: Path | None = None) -> str:
    """Convert into the folder the run will read (`data_cache_path`, else data.default_cache_dir(run_dir))."""
    import warnings

    with warnings.catch_warnings():
        # megatron-core says at import that TransformerEngine and Apex are missing: nothing a
        # conversion uses, and the command's output should be its progress and its result
        warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed",
                                category=UserWarning)
        from primus_megatron.data import default_cache_dir, prepare_indexed_dataset

    native = resolved.native
    data = resolved.module.data
    cache = native.get("data_cache_path") or default_cache_dir(run_dir)
    prefix = prepare_indexed_dataset(data.path, data.tokenizer or native["tokenizer_model"],
                                     json_key=data.text_key or "text", cache_dir=cache, progress=True)
    return f"indexed dataset ready: {prefix}.bin / .idx"
