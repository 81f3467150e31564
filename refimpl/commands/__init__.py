"""Subcommands of the ``ponder`` command line, one module each."""
