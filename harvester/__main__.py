"""``python -m harvester``: the same as the ``harvester`` command."""

from .cli import main

raise SystemExit(main())
