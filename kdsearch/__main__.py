"""``python -m kdsearch``: the same entry point as the ``kdsearch`` console script."""

from kdsearch.cli import main

main()
