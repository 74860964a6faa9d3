"""A local JSONL corpus, read once by core's reader before MaxText's own loader sees it.

MaxText reads `data.path` through Hugging Face datasets' `json` builder (`dataset_type: hf`,
`hf_path: json`, `hf_train_files`), which meets a bad line only while training and fails with a
pyarrow traceback naming neither file nor line. `primus.runs.corpus.read_documents` streams the whole
file once instead (every process of the job, before JAX starts): a line that is not JSON, not an
object or lacks the text column is a ConfigError naming `file:line` (exit 2).
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from primus.runs.corpus import read_documents
from primus_maxtext.base_config import base_defaults


def _local_jsonl(files: Any, data_dir: str) -> Iterator[Path]:
    patterns = [files] if isinstance(files, str) else list(files or [])
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern or "://" in pattern:
            continue
        path = Path(pattern).expanduser()
        if data_dir and not path.is_absolute():
            path = Path(data_dir).expanduser() / path
        for match in sorted(glob.glob(str(path))):
            if match.endswith(".jsonl") and Path(match).is_file():
                yield Path(match)


def corpora(config: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """(file, text column) for each local JSONL file MaxText's HF json loader will read (a key the
    config leaves out has MaxText's base.yml value)."""
    defaults = base_defaults()

    def get(key: str) -> Any:
        return config[key] if key in config else defaults.get(key)

    if get("dataset_type") != "hf" or get("hf_path") != "json":
        return []
    out: list[tuple[Path, str]] = []
    reads = [("hf_train_files", "train_data_columns")]
    if int(get("eval_interval") or 0) > 0:
        reads.append(("hf_eval_files", "eval_data_columns"))
    for files_key, columns_key in reads:
        columns = get(columns_key)
        column = str(columns[0]) if isinstance(columns, list) and columns else "text"
        out += [(path, column) for path in _local_jsonl(get(files_key), str(get("hf_data_dir") or ""))]
    return out


def validate_corpora(config: Mapping[str, Any]) -> int:
    """Read every local JSONL corpus of the run whole (streaming); returns how many documents."""
    documents = 0
    for path, column in corpora(config):
        for _ in read_documents(path, column):
            documents += 1
    return documents
