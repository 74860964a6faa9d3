"""Make the bundled toy instruction set for post-training, deterministically and licence-clean.

    python examples/data/make_instructions.py      # writes instructions.jsonl next to this file

32 prompt_completion records: "reverse: Ada Bruno Chen ->" answered by " Chen Bruno Ada", over the
names of the example corpus (each one token of the example tokenizer), so a tiny model fine-tuned for a few
hundred steps on the CPU answers them exactly (tests/hf/test_posttrain.py, examples/hf/*sft*_tiny.yaml).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_corpus import NAMES  # type: ignore[import-not-found]  (run from this folder's script path)

HERE = Path(__file__).resolve().parent
SEED = 20261202
RECORDS = 32


def records(count: int = RECORDS, seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    out = []
    while len(out) < count:
        words = tuple(rng.sample(NAMES, 3))
        if words in seen:
            continue
        seen.add(words)
        out.append({"prompt": f"reverse: {' '.join(words)} ->", "completion": " " + " ".join(reversed(words))})
    return out


def main() -> None:
    path = HERE / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
