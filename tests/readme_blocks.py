"""README.md's sections and code blocks, and running a shell block as a reader would: the
README's commands are tested as written (only ports are swapped for free ones)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(start: str, end: str = "\n## ") -> str:
    """The README's text from the first ``start`` up to the next ``end`` (the next section)."""
    text = README.read_text(encoding="utf-8")
    at = text.index(start)
    return text[at : text.index(end, at + 1)]


def code_blocks(text: str, language: str = "sh") -> list[str]:
    """The fenced blocks of ``language`` in ``text``."""
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def run_sh(
    block: str, cwd: Path, *, timeout: float, drop_env: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``block`` in ``sh`` from ``cwd``, this venv's commands first on PATH and the variables
    starting with ``drop_env`` removed (so the developer's own settings cannot leak in)."""
    env = {k: v for k, v in os.environ.items() if not (drop_env and k.startswith(drop_env))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["sh", "-c", block], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
