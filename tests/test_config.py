"""Settings from --config files and HARVESTER_* variables: precedence, errors, ``config show``."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest

from harvester import cli
from harvester.bench import BenchSettings, parse_ramp, parse_slo
from harvester.cli import build_parser, main, settings_from
from harvester.config import (
    ENV_PREFIX,
    SOURCES,
    convert,
    leaf_parser,
    resolve,
    setting_actions,
)
from harvester.errors import UsageError

from .conftest import TOKEN, ThreadedSimulator, make_ids, read_rows, write_csv

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The layers a value can come from, lowest first, with the value each one sets --rate to.
LAYER_RATE = {"file": 11.0, "env": 22.0, "cli": 33.0}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HARVESTER_* variable or token of the machine running the tests leaks in."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name == cli.TOKEN_ENV:
            monkeypatch.delenv(name)


def show(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, dict[str, Any]]:
    """``harvester config show ARGS --json``, parsed."""
    assert main(["config", "show", *args, "--json"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    parsed: dict[str, dict[str, Any]] = orjson.loads(out)
    return parsed


def fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``argv``; it must exit 2 with exactly one line on stderr, which is returned."""
    try:
        code: object = main(argv)
    except SystemExit as stopped:
        code = stopped.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1, lines
    return lines[0]


def _parses(action: argparse.Action, text: str) -> bool:
    try:
        convert(action, text, "test")
    except UsageError:
        return False
    return True


def run_keys() -> dict[str, argparse.Action]:
    parser = build_parser("config")
    args = parser.parse_args(["config", "show"])
    return setting_actions(leaf_parser(parser, args))


@pytest.mark.parametrize(
    ("layers", "winner"),
    [
        ((), "default"),
        (("file",), "file"),
        (("env",), "env"),
        (("cli",), "cli"),
        (("file", "env"), "env"),
        (("file", "cli"), "cli"),
        (("env", "cli"), "cli"),
        (("file", "env", "cli"), "cli"),
    ],
)
def test_precedence_over_every_pair_of_sources(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    layers: tuple[str, ...],
    winner: str,
) -> None:
    """cli > env > file > default, for each pair and all three at once."""
    args: list[str] = []
    if "file" in layers:
        (tmp_path / "c.toml").write_text(f"rate = {LAYER_RATE['file']}\n")
        args += ["--config", str(tmp_path / "c.toml")]
    if "env" in layers:
        monkeypatch.setenv("HARVESTER_RATE", str(LAYER_RATE["env"]))
    if "cli" in layers:
        args += ["--rate", str(LAYER_RATE["cli"])]
    rate = show(capsys, *args)["rate"]
    expected = LAYER_RATE.get(winner, cli.DEFAULTS["rate"])
    assert rate == {"value": expected, "source": winner}


def test_every_run_option_is_a_key_of_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each setting (options added later included) is read from a file and from a variable."""
    values: dict[str, Any] = {}
    for key, action in run_keys().items():
        if action.nargs == 0:
            values[key] = True
        elif action.choices:
            values[key] = list(action.choices)[-1]
        elif action.default is None:  # the first of these the option's own parser takes
            values[key] = next(v for v in (f"some/{key}", "1") if _parses(action, v))
        else:
            values[key] = str(action.default)
    lines = [f"{key} = {orjson.dumps(value).decode()}" for key, value in values.items()]
    (tmp_path / "all.toml").write_text("\n".join(lines) + "\n")
    from_file = show(capsys, "--config", str(tmp_path / "all.toml"))
    for key, value in values.items():
        monkeypatch.setenv(ENV_PREFIX + key.upper(), "true" if value is True else str(value))
    from_env = show(capsys, "--config", str(tmp_path / "all.toml"))
    for key in values:
        assert from_file[key]["source"] == "file", key
        assert from_env[key]["source"] == "env", key
        assert from_file[key]["value"] == from_env[key]["value"], key


def test_show_json_shape_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    """--json is one object of {value, source} per setting; the text form is one line each."""
    shown = show(capsys)
    assert set(shown) == {*run_keys(), "token"}
    for key, entry in shown.items():
        assert set(entry) == {"value", "source"}, key
        assert entry["source"] in SOURCES
    assert shown["rate"] == {"value": 100.0, "source": "default"}
    assert shown["shard"] == {"value": "0/1", "source": "default"}
    assert shown["ids"] == {"value": None, "source": "default"}
    assert main(["config", "show", "--rate", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(shown)
    assert re.fullmatch(
        r"rate\s+7\.0\s+cli", next(line for line in lines if line.startswith("rate"))
    )


def test_the_token_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From the environment or a --token-file, config show says where it is, never what."""
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
    assert show(capsys)["token"] == {"value": "(hidden)", "source": "env"}
    assert main(["config", "show"]) == 0
    assert TOKEN not in capsys.readouterr().out
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "c.toml").write_text(f'token_file = "{tmp_path / "token"}"\n')
    shown = show(capsys, "--config", str(tmp_path / "c.toml"))
    assert shown["token"] == {"value": "(hidden)", "source": "cli"}
    assert TOKEN not in orjson.dumps(shown).decode()
    monkeypatch.delenv(cli.TOKEN_ENV)
    assert show(capsys)["token"] == {"value": None, "source": "default"}


@pytest.mark.parametrize("where", ["file", "env"])
@pytest.mark.parametrize("name", ["token", "api_token"])
def test_a_token_in_a_file_or_variable_is_refused_without_echoing_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
    name: str,
) -> None:
    """The token is never a setting: one line saying where it belongs, and not its value."""
    argv = ["config", "show"]
    if where == "file":
        (tmp_path / "c.toml").write_text(f'{name} = "{TOKEN}"\n')
        argv += ["--config", str(tmp_path / "c.toml")]
    else:
        monkeypatch.setenv(ENV_PREFIX + name.upper(), TOKEN)
    line = fails(capsys, argv)
    assert "MASSIVE_API_TOKEN" in line
    assert TOKEN not in line


@pytest.mark.parametrize(
    ("key", "nearest"),
    [("rat", "rate"), ("max-in-play", "max_in_play"), ("concurency", "concurrency"), ("é", "")],
)
def test_an_unknown_key_in_a_file_names_key_file_and_nearest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, nearest: str
) -> None:
    """Exit 2, one line: the file, the key, and the nearest valid key."""
    path = tmp_path / "dir with space" / "my.toml"
    path.parent.mkdir()
    path.write_text(f'"{key}" = 5\n', encoding="utf-8")
    line = fails(capsys, ["run", "--config", str(path)])
    assert str(path) in line
    assert repr(key) in line
    match = re.search(r"nearest valid key is '([a-z_]+)'", line)
    assert match is not None
    assert match[1] in run_keys()
    if nearest:
        assert match[1] == nearest


def test_an_unknown_variable_names_it_and_the_nearest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in the environment is exit 2, naming the variable and the nearest valid one."""
    monkeypatch.setenv("HARVESTER_RAET", "5")
    line = fails(capsys, ["run", "--ids", "x.csv", "--out", "o"])
    assert "HARVESTER_RAET" in line
    assert line.endswith("HARVESTER_RATE")


def test_another_commands_variable_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HARVESTER_STEP_SECONDS is bench's: run ignores it; a file may not use it for run."""
    monkeypatch.setenv("HARVESTER_STEP_SECONDS", "3")
    assert "step_seconds" not in show(capsys)


@pytest.mark.parametrize(
    ("where", "key", "raw", "says"),
    [
        ("env", "rate", "abc", "'abc' is not a number"),
        ("env", "rate", "", "is not a number"),
        ("env", "concurrency", "1.5", "must be a whole number (got '1.5')"),
        ("env", "strict", "maybe", "must be true or false"),
        ("env", "log_format", "xml", "must be one of text, json"),
        ("env", "shard", "2/2", "shard"),
        ("file", "rate", '"abc"', "'abc' is not a number"),
        ("file", "rate", "true", "is not a number"),
        ("file", "concurrency", "1.5", "must be a whole number"),
        ("file", "base_url", "5", "must be a string"),
        ("file", "rate", "[1, 2]", "must be a single value"),
        ("file", "strict", '"yes please"', "must be true or false"),
        ("file", "max_wait", "-1", "must be > 0"),
    ],
)
def test_a_bad_value_is_one_line_naming_where_it_came_from(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
    key: str,
    raw: str,
    says: str,
) -> None:
    """Values from a file or a variable go through the option's own parsing: exit 2, one line."""
    argv = ["config", "show"]
    if where == "env":
        monkeypatch.setenv(ENV_PREFIX + key.upper(), raw)
        origin = ENV_PREFIX + key.upper()
    else:
        (tmp_path / "c.toml").write_text(f"{key} = {raw}\n")
        argv += ["--config", str(tmp_path / "c.toml")]
        origin = f"{tmp_path / 'c.toml'}: {key}"
    line = fails(capsys, argv)
    assert line.startswith(f"harvester: error: {origin}: ")
    assert says in line


def test_values_from_a_file_are_validated_like_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What RunSettings refuses on the command line it refuses from a variable: exit 2."""
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
    monkeypatch.setenv("HARVESTER_CONCURRENCY", "0")
    ids = write_csv(tmp_path / "ids.csv", make_ids(3))
    line = fails(capsys, ["run", "--ids", str(ids), "--out", str(tmp_path / "out")])
    assert "--concurrency must be >= 1" in line
    assert line.endswith("(set by HARVESTER_CONCURRENCY)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "cannot read it"), ("rate = = 1", "not valid TOML"), (b"\xff\xfe", "not UTF-8")],
)
def test_an_unreadable_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes | None, says: str
) -> None:
    """A missing, malformed or binary --config is exit 2 with one line naming it."""
    path = tmp_path / "c.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    line = fails(capsys, ["run", "--config", str(path)])
    assert str(path) in line
    assert says in line


def test_the_config_file_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HARVESTER_CONFIG names the file when --config is not given; --config wins over it."""
    (tmp_path / "a.toml").write_text("rate = 5\n")
    (tmp_path / "b.toml").write_text("rate = 6\n")
    monkeypatch.setenv("HARVESTER_CONFIG", str(tmp_path / "a.toml"))
    assert show(capsys)["rate"] == {"value": 5.0, "source": "file"}
    assert show(capsys, "--config", str(tmp_path / "b.toml"))["rate"]["value"] == 6.0


@pytest.mark.parametrize("form", [["--rate=7"], ["--ra", "7"], ["--rate", "1", "--rate", "7"]])
def test_every_command_line_form_counts_as_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    form: list[str],
) -> None:
    """--opt=value, an abbreviation, a repeated option: argparse's own rules decide."""
    monkeypatch.setenv("HARVESTER_RATE", "3")
    assert show(capsys, *form)["rate"] == {"value": 7.0, "source": "cli"}


def test_a_workers_child_runs_alone_whatever_its_config_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A --workers child inherits the environment and the --config: it must not fan out again."""
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
    monkeypatch.setenv("HARVESTER_WORKERS", "4")
    argv = ["run", "--ids", "ids.csv", "--out", "out"]
    for extra, workers in (([], 4), (["--worker-stats"], 1)):
        parser = build_parser("run")
        args = parser.parse_args([*argv, *extra])
        resolve(parser, [*argv, *extra], args)
        assert settings_from(args).workers == workers


def test_options_that_exclude_each_other_are_one_setting(tmp_path: Path) -> None:
    """bench: --rates on the command line replaces the file's ramp instead of clashing."""
    (tmp_path / "b.toml").write_text('ramp = "10:20:10"\nsynthetic = 5\n')
    argv = ["bench", "--config", str(tmp_path / "b.toml"), "--rates", "7", "--ids", "x.csv"]
    parser = build_parser("bench")
    args = parser.parse_args(argv)
    resolved = resolve(parser, argv, args, environ={})
    assert (args.rates, args.ramp, args.ids, args.synthetic) == ("7", None, Path("x.csv"), None)
    assert resolved.sources["ramp"] == resolved.sources["synthetic"] == "default"


def test_ids_and_out_are_required_from_some_layer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --ids anywhere, run says where it may come from."""
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
    line = fails(capsys, ["run", "--out", "o"])
    assert "--ids is required" in line
    assert "HARVESTER_IDS" in line


def test_a_pipeline_step_from_a_file_and_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole run whose settings all come from a file and the environment."""
    ids = write_csv(tmp_path / "ids.csv", make_ids(50))
    out = tmp_path / "out"
    with ThreadedSimulator() as sim:
        (tmp_path / "step.toml").write_text(
            f'ids = "{ids}"\nout = "{out}"\nbase_url = "{sim.base_url}"\nrate = 500\n'
        )
        monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
        monkeypatch.setenv("HARVESTER_CONFIG", str(tmp_path / "step.toml"))
        monkeypatch.setenv("HARVESTER_NO_PROGRESS", "1")
        monkeypatch.setenv("HARVESTER_LOG_FORMAT", "json")
        assert main(["run", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["unique_ids"] == 50
    assert read_rows(out).num_rows == 50


def _shipped(name: str) -> list[Path]:
    return sorted(
        p for p in CONFIGS.glob("*.toml") if (p.name == "bench.toml") == (name == "bench")
    )


@pytest.mark.parametrize("path", _shipped("run"), ids=lambda p: p.name)
def test_each_shipped_run_config_loads_and_validates(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/*.toml for run: every key known, every value accepted by RunSettings."""
    shown = show(capsys, "--config", str(path))
    assert {entry["source"] for entry in shown.values()} <= {"file", "default"}
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
    argv = ["run", "--config", str(path), "--ids", "ids.csv", "--out", "out"]
    parser = build_parser("run")
    args = parser.parse_args(argv)
    resolve(parser, argv, args)
    settings_from(args)  # raises on any value RunSettings refuses
    cli.log_settings(args)


def test_default_toml_shows_every_run_setting_at_its_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commented template lists every key once, each with its real default."""
    text = (CONFIGS / "default.toml").read_text()
    lines = [m[1] for m in re.finditer(r"^# ([a-z_]+ = .*)$", text, re.M)]
    template = tomllib.loads("\n".join(lines))
    missing, extra = set(run_keys()) - set(template), set(template) - set(run_keys())
    assert not missing, f"add to configs/default.toml, commented, at the default: {missing}"
    assert not extra, f"configs/default.toml lists keys run does not have: {extra}"
    uncommented = tmp_path / "default.toml"
    # Settings with no default (None) are shown with an example value instead.
    examples = {key for key, action in run_keys().items() if action.default is None}
    kept = [line for line in lines if line.split(" ", 1)[0] not in examples]
    uncommented.write_text("\n".join(kept))
    shown = show(capsys, "--config", str(uncommented))
    defaults = show(capsys)
    for key in set(template) - examples:
        assert shown[key] == {"value": defaults[key]["value"], "source": "file"}, key


def test_the_shipped_bench_config_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/bench.toml drives a whole benchmark (its steps shortened) against the simulator."""
    [path] = _shipped("bench")
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
    with ThreadedSimulator() as sim:
        argv = ["bench", "--config", str(path), "--base-url", sim.base_url]
        code = main([*argv, "--step-seconds", "0.2", "--ramp", "20:40:20", "--json"])
    result = orjson.loads(capsys.readouterr().out)
    assert code == 0
    assert len(result["steps"]) == 2
    parser = build_parser("bench")
    args = parser.parse_args(argv)
    resolve(parser, argv, args)
    settings = BenchSettings(  # the file's own ramp and SLO, as bench takes them
        base_url=args.base_url,
        token=TOKEN,
        rates=parse_ramp(args.ramp),
        synthetic=args.synthetic,
        step_seconds=args.step_seconds,
        concurrency=args.concurrency,
        slo=parse_slo(args.slo),
        request_timeout=args.request_timeout,
    )
    assert settings.rates[0] == 50
    assert settings.slo is not None
