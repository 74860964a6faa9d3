"""`primus data prepare` for Megatron: convert the experiment's corpus to indexed .bin/.idx once."""

from __future__ import annotations

from typing import Any


def prepare(resolved: Any) -> str:
    import warnings

    with warnings.catch_warnings():
        # megatron-core says at import that TransformerEngine and Apex are missing: nothing a
        # conversion uses, and the command's output should be its progress and its result
        warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed",
                                category=UserWarning)
        from primus_megatron.data import prepare_indexed_dataset

    native = resolved.native
    data = resolved.module.data
    prefix = prepare_indexed_dataset(data.path, data.tokenizer or native["tokenizer_model"],
                                     json_key=data.text_key or "text", cache_dir=native.get("data_cache_path"),
                                     progress=True)
    return f"indexed dataset ready: {prefix}.bin / .idx"
