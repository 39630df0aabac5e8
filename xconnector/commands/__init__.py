"""The `xconnector` command's subcommands, one module each."""
