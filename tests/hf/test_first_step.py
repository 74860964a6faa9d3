"""Issue 12's first-step parity on the hf backend: `primus run` of one step from the tiny Llama's Hugging Face
weights on the shared batch (tests/first_step.py) logs transformers' own loss on it, to 1e-6 relative (the issue
asks 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.first_step import check_backend

pytestmark = pytest.mark.slow


def test_first_step_loss_is_transformers_loss_on_the_shared_batch(tmp_path: Path) -> None:
    check_backend(tmp_path, "hf")
