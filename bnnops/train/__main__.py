"""``python -m bnnops.train``: see :mod:`bnnops.train.cli` (or ``--help``)."""

from bnnops.train.cli import main

if __name__ == "__main__":
    main()
