"""The `lesionkit` subcommands: argument parsing and printing only. Nothing imports these but `lesionkit.cli`."""
