"""The e2e check that `config show --explain` names the true layer (cli, derived, module preset,
extends, ${VAR}), run in the maxtext session: maxtext needs Python 3.12, so the e2e session on 3.11
skips it (the other backends' cases skip here)."""

from tests.e2e.test_explain_layers import test_explain_names_the_true_layer

__all__ = ["test_explain_names_the_true_layer"]
