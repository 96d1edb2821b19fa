"""The command line as a contract: exit codes, one-line errors, the JSON summary."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from harvester.cli import build_parser, main
from harvester.errors import ExitCode

from .conftest import TOKEN, ThreadedSimulator, make_ids, write_csv

REQUIRED_KEYS = {
    "unique_ids",
    "completed",
    "failed",
    "invalid",
    "unresolved",
    "requests",
    "elapsed_s",
    "requests_per_s",
    "latency_ms",
}


def run_args(ids: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["run", "--ids", str(ids), "--out", str(out), "--base-url", url, "--no-progress", *extra]


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token comes from the environment, as in production."""
    monkeypatch.setenv("MASSIVE_API_TOKEN", TOKEN)


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    (tmp / "empty.csv").write_text("")
    (tmp / "header.csv").write_text("id\n")
    (tmp / "binary.csv").write_bytes(b"\x00\x01\x02\xff" * 100)
    (tmp / "nocol.csv").write_text("name,value\na,1\n")
    (tmp / "adir.csv").mkdir()
    return {
        "empty": tmp / "empty.csv",
        "header only": tmp / "header.csv",
        "binary": tmp / "binary.csv",
        "no id column": tmp / "nocol.csv",
        "missing": tmp / "missing.csv",
        "directory": tmp / "adir.csv",
    }


@pytest.mark.parametrize(
    "case", ["empty", "header only", "binary", "no id column", "missing", "directory"]
)
@pytest.mark.usefixtures("token_env")
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Unusable input fails before any request: exit 2, one line on stderr, no traceback."""
    path = _bad_inputs(tmp_path)[case]
    code = main(run_args(path, tmp_path / "out", "http://127.0.0.1:9"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith("harvester: error:")
    assert str(path) in err[0]
    assert not (tmp_path / "out").exists(), "a refused input must leave no trace in DIR"


def test_missing_token_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without MASSIVE_API_TOKEN or --token-file the run refuses to start and says what to do."""
    monkeypatch.delenv("MASSIVE_API_TOKEN", raising=False)
    ids = write_csv(tmp_path / "ids.csv", make_ids(3))
    assert main(run_args(ids, tmp_path / "out", "http://127.0.0.1:9")) == 2
    assert "MASSIVE_API_TOKEN" in capsys.readouterr().err


@pytest.mark.usefixtures("token_env")
def test_plain_http_to_a_remote_host_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The token is not sent in clear text to a non-loopback host unless asked."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(3))
    assert main(run_args(ids, tmp_path / "out", "http://example.com")) == 2
    assert "--allow-insecure" in capsys.readouterr().err


@pytest.mark.usefixtures("token_env")
def test_json_summary_is_the_only_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one JSON object on stdout with the documented keys; logs go to stderr."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(120))
    with ThreadedSimulator() as sim:
        code = main(run_args(ids, tmp_path / "out", sim.base_url, "--json", "--rate", "1000"))
    out = capsys.readouterr().out
    summary = orjson.loads(out)
    assert code == 0
    assert summary.keys() >= REQUIRED_KEYS
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert summary["unique_ids"] == summary["completed"] + summary["failed"] == 120
    assert out.count("\n") == 1
    saved = list((tmp_path / "out" / "_harvester" / "runs").glob("*.json"))
    assert orjson.loads(saved[0].read_bytes())["unique_ids"] == 120


def test_token_file_and_human_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--token-file works, and without --json a short human summary is printed."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(40))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with ThreadedSimulator() as sim:
        args = run_args(ids, tmp_path / "out", sim.base_url, "--token-file", str(token_file))
        code = main(args)
    captured = capsys.readouterr()
    assert code == 0
    assert "40 unique ids" in captured.out
    assert TOKEN not in captured.out + captured.err


def test_module_entry_point_and_help() -> None:
    """``python -m harvester --help`` works and lists the three commands."""
    done = subprocess.run(
        [sys.executable, "-m", "harvester", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    for command in ("run", "serve", "demo"):
        assert command in done.stdout


@pytest.mark.parametrize(
    "extra",
    [
        ["--rate", "-5"],
        ["--rate", "abc"],
        ["--shard", "2/2"],
        ["--bogus"],
        ["--concurrency", "x"],
        ["--expected-ready", "5-x"],
        ["--expected-ready", "9-3"],
    ],
    ids=[
        "negative",
        "not-a-number",
        "shard",
        "unknown-option",
        "not-an-int",
        "ready-not-a-range",
        "ready-reversed",
    ],
)
def test_a_bad_command_line_is_one_line_naming_the_commands_help(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    """No usage block first: one line saying what is wrong and which --help to read."""
    try:
        code: object = main(["run", "--ids", "ids.csv", "--out", str(tmp_path / "out"), *extra])
    except SystemExit as stopped:  # argparse's own errors leave by exit(2)
        code = stopped.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("harvester run: error: ")
    assert err[0].endswith("(see harvester run --help)")
    assert "usage:" not in err[0]
    assert "_positive_float" not in err[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``harvester --version`` prints the installed version."""
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith("harvester ")


# -- a command line that explains itself ------------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser, ``config show`` included, by its name."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            for child, sub in action.choices.items():
                walk(sub, f"{name} {child}".strip())
        if not subs:
            found[name] = parser

    walk(build_parser(), "")
    return found


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]


def test_every_command_is_covered() -> None:
    """The commands the help tests below walk through (a new one is walked automatically)."""
    assert {"run", "serve", "demo", "bench", "config show", "inspect"} <= set(_commands())


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_says_what_it_means_its_default_and_its_placeholder(command: str) -> None:
    """Non-empty help (none suppressed but the internal --worker-stats), the default shown
    where there is one ([off] for a flag), and a placeholder that says what to give."""
    parser = _commands()[command]
    for action in _options(parser):
        name = action.option_strings[-1]
        if name == "--worker-stats":
            assert action.help is argparse.SUPPRESS  # set by --workers for its children only
            continue
        assert action.help, (command, name)
        assert action.help is not argparse.SUPPRESS, (command, name)
        if action.nargs == 0:  # a flag
            assert "[off" in action.help or name == "--json", (command, name)
            continue
        assert action.metavar is not None or action.choices, (command, name)
        assert str(action.metavar).isupper() or action.choices, (command, name)
        if action.default is not None:
            shown = parser._get_formatter()._expand_help(action)
            assert f"[{action.default}" in shown or f"[{action.default} bytes" in shown, (
                command,
                name,
                shown,
            )


def test_run_help_lists_exit_codes_and_the_token_variable() -> None:
    """``run --help``: every ExitCode with its meaning, MASSIVE_API_TOKEN as required."""
    text = _commands()["run"].format_help()
    for code in ExitCode:
        assert code.meaning, f"errors.EXIT_MEANINGS has no line for {code!r}"
        assert re.search(rf"^\s+{int(code)}\s+{re.escape(code.meaning)}$", text, re.M), code
    assert re.search(r"MASSIVE_API_TOKEN\s+the API token: required", text)
    assert "HARVESTER_<NAME>" in text
    assert "[26214400 bytes (25 MiB)]" in " ".join(text.split())
    assert "[0/1: the whole input]" in " ".join(text.split())


def test_top_level_help_has_no_markup() -> None:
    """The description is plain text: no ``double-backtick`` markup from a docstring."""
    text = build_parser().format_help()
    assert "``" not in text
    for command in ("run", "serve", "demo", "bench", "config", "inspect"):
        assert re.search(rf"^\s+{command}\s+\w", text, re.M), command
