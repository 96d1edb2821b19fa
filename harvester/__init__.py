"""harvester: pull async completions out of the Massive AI API into a Parquet dataset.

The package is its command line (``harvester.cli``); for use from Python, ``harvester.runner
.harvest`` runs one harvest with ``harvester.settings.RunSettings``. See docs/ARCHITECTURE.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("harvester")
except PackageNotFoundError:  # pragma: no cover - a checkout that was never installed
    __version__ = "0.0.0"
