"""Model modules of this package that follow TorchTitan's model protocol (a `ModelSpec` with a model
config, a parallelize function and TorchTitan's own building blocks), for families TorchTitan 0.3
does not ship. Imported only when a run builds one (they import torchtitan)."""
