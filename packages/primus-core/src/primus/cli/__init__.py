"""The `primus` command. Subcommands import what they need on use, so --help stays fast."""
