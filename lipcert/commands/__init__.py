"""The ``lipcert`` subcommands, one module per verb.

Each module has ``add_parser(subparsers)``, which registers the verb and sets
``args.handler``, and ``run(args) -> int``, which calls one Python API function and prints
what it returns: ``train`` (``lipcert.train``), ``certify`` (``lipcert.certify_run``),
``attack`` (``attacks.run``), ``report`` (``reports.build``), ``demo`` (``lipcert.demo``).
``args`` holds the shared argument types, ``display`` the terminal-or-pipe output.
"""
