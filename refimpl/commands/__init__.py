"""Subcommands of the ``ponder`` command line, one module each (listed in :data:`refimpl.cli.COMMANDS`).

A command module exposes ``add_arguments(parser)`` and ``run(args)`` and imports no other command.
What several commands share lives in modules here that are not commands: :mod:`.arguments`
(argument types, the help layout, the user-error type, the backend choice for a checkpoint),
:mod:`.drawing` (the computation-time map figure) and :mod:`.parity_experiment` (the parity run
behind ``ponder parity`` and ``ponder train --task parity``).
"""
