"""harvester: pull async completions out of the Massive AI API into a Parquet dataset.

The package is its command line (``harvester.cli``); for use from Python, ``harvester.runner
.harvest`` runs one harvest with ``harvester.settings.RunSettings``. See docs/ARCHITECTURE.md.
"""

from .allocator import prefer_jemalloc

prefer_jemalloc()  # before anything imports pyarrow (see allocator.py)

# The one place the version is written: pyproject.toml reads it from here (hatch's version
# source), so no start-up pays for importlib.metadata's scan of the installed packages.
__version__ = "0.1.0"
