"""``python -m firered_core``: see :mod:`firered_core.cli`."""

from .cli import main

raise SystemExit(main())
