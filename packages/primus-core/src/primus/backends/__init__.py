"""Backend discovery: the `primus.backends` entry-point group and the light spec each one exports."""
