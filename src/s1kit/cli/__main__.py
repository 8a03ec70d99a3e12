"""``python -m s1kit.cli``: the same as the ``s1kit`` console script."""

from . import main

main()
