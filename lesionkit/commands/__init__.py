"""The `lesionkit` subcommands: argument parsing and printing only; only `lesionkit.cli` imports them."""
