"""``python -m sdexport``: the same CLI as the ``sdexport`` script."""

from .cli import main

main()
