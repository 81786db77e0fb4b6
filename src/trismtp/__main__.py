"""``python -m trismtp``: the same as the ``trismtp`` command."""

from trismtp.cli import main

main()
