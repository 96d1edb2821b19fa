"""The orchestrator examples in configs/ run commands that harvester's own parser accepts."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import shlex
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from harvester.cli import build_parser
from harvester.shard import Shard
from harvester.storage import parse_location

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
K8S_JOB = CONFIGS / "k8s-indexed-job.yaml"
AIRFLOW_DAG = CONFIGS / "airflow_dag.py"
MIN_GRACE_SECONDS = 30  # harvester: up to 10 s for requests in flight, then the final commit
NO_RETRY_CODES = {2, 3}  # bad input or settings; token or credit refused
RETRY_CODES = {1, 130}  # unresolved ids; stopped by a signal


def parse_run(command: list[str]) -> Any:
    """``harvester run ...`` parsed by the real CLI parser (argparse exits on any error)."""
    assert command[0] == "harvester"
    args = build_parser().parse_args(command[1:])
    assert args.command == "run"
    return args


# -- Kubernetes ------------------------------------------------------------------------------


def load_job() -> dict[str, Any]:
    doc = yaml.safe_load(K8S_JOB.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def test_k8s_job_is_an_indexed_job_with_one_pod_per_shard() -> None:
    """An Indexed batch/v1 Job whose completions, parallelism and the N of --shard agree."""
    job = load_job()
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    [container] = spec["template"]["spec"]["containers"]
    args = container["args"]
    shard = args[args.index("--shard") + 1]
    assert shard == f"$(JOB_COMPLETION_INDEX)/{spec['completions']}"
    assert spec["parallelism"] == spec["completions"]


def test_k8s_each_pods_command_parses_as_a_run_of_its_shard() -> None:
    """With $(JOB_COMPLETION_INDEX) substituted, every pod's command is a valid ``run`` of
    shard K/N, with the JSON summary, log lines, and input and output in S3 (no shared disk)."""
    job = load_job()
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    count = job["spec"]["completions"]
    env = {e["name"]: e for e in container["env"]}
    assert "JOB_COMPLETION_INDEX" in env  # $(VAR) in args expands only variables in env
    assert "volumes" not in pod
    for index in range(count):
        args = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in container["args"]]
        parsed = parse_run([*container["command"], *args])
        assert parsed.shard == Shard(index, count)
        assert parsed.json
        assert parsed.no_progress
        assert parsed.workers == 1
        for location in (parsed.ids, parsed.out):
            assert isinstance(parse_location(location), str)
            assert location.startswith("s3://")


def test_k8s_s3_credentials_come_from_the_service_account_or_secrets() -> None:
    """S3 access comes from the pod's service account (IRSA) and a region; no AWS key is a
    literal in the manifest, and the commented MinIO keys come from a Secret."""
    job = load_job()
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_REGION"]["value"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    text = K8S_JOB.read_text(encoding="utf-8")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        [line] = [i for i, line in enumerate(text.splitlines()) if f"name: {name}" in line]
        assert "secretKeyRef" in text.splitlines()[line + 1]


def test_k8s_token_comes_from_a_secret_and_the_grace_period_covers_the_stop() -> None:
    """MASSIVE_API_TOKEN comes from a Secret (never a literal), and the pod's termination
    grace period, explained in a comment, leaves room for harvester's 10 s + final commit."""
    job = load_job()
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [token] = [e for e in container["env"] if e["name"] == "MASSIVE_API_TOKEN"]
    assert "value" not in token
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["name"]
    assert ref["key"]
    assert pod["terminationGracePeriodSeconds"] >= MIN_GRACE_SECONDS
    lines = K8S_JOB.read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if "terminationGracePeriodSeconds" in line)
    comment = " ".join(line for line in lines[max(0, at - 6) : at] if line.strip().startswith("#"))
    assert "SIGTERM" in comment
    assert "10 s" in comment


def test_k8s_failure_policy_retries_only_what_a_rerun_can_finish() -> None:
    """Exit 2 and 3 fail the index without retries; 1 and 130 are never in a failing rule."""
    job = load_job()
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    failing: set[int] = set()
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        codes = rule["onExitCodes"]
        assert codes["operator"] == "In"
        if rule["action"] in ("FailJob", "FailIndex"):
            failing.update(codes["values"])
    assert failing >= NO_RETRY_CODES
    assert not failing & RETRY_CODES


# -- Airflow ---------------------------------------------------------------------------------


def dag_module() -> ast.Module:
    return ast.parse(AIRFLOW_DAG.read_text(encoding="utf-8"))


def dag_constants(tree: ast.Module) -> dict[str, Any]:
    """Module-level ``NAME = literal`` assignments."""
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                with contextlib.suppress(ValueError):  # not a literal
                    found[target.id] = ast.literal_eval(node.value)
    return found


def shard_command_from_source(tree: ast.Module) -> Callable[[int], list[str]]:
    """The DAG's own ``shard_command`` and the constants it reads, compiled without Airflow."""
    names = {"SHARDS", "TOTAL_RATE", "COMMAND", "shard_command"}
    body: list[ast.stmt] = [ast.Import(names=[ast.alias(name="shlex")])]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            body.append(node)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in names for t in targets):
                body.append(node)
    module = ast.fix_missing_locations(ast.Module(body=body, type_ignores=[]))
    namespace: dict[str, Any] = {}
    exec(compile(module, str(AIRFLOW_DAG), "exec"), namespace)
    command: Callable[[int], list[str]] = namespace["shard_command"]
    return command


def test_airflow_dag_maps_one_task_per_shard() -> None:
    """The DAG expands one task over range(SHARDS) with dynamic task mapping."""
    tree = dag_module()
    expands = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "expand"
    ]
    assert len(expands) == 1
    [keyword] = expands[0].keywords
    assert keyword.arg == "shard"
    assert ast.unparse(keyword.value) == "list(range(SHARDS))"


def test_airflow_each_shards_command_parses_and_splits_the_rate() -> None:
    """Every mapped task's command is a valid ``run`` of shard K/N whose --rate is the DAG's
    total budget divided by N (--rate is per process)."""
    tree = dag_module()
    constants = dag_constants(tree)
    count, total = constants["SHARDS"], constants["TOTAL_RATE"]
    assert isinstance(count, int)
    assert count > 1
    command = shard_command_from_source(tree)
    seen = set()
    for index in range(count):
        argv = command(index)
        assert argv == shlex.split(shlex.join(argv))
        parsed = parse_run(argv)
        assert parsed.json
        assert parsed.no_progress
        assert parsed.rate * count == pytest.approx(total)
        seen.add(parsed.shard)
    assert seen == {Shard(k, count) for k in range(count)}


def fake_airflow(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Just enough of Airflow 3's API to import the DAG; records the ``expand`` calls."""
    expanded: list[dict[str, Any]] = []

    class Task:
        def __init__(self, fn: Callable[..., Any]) -> None:
            self.fn = fn

        def expand(self, **kwargs: Any) -> None:
            expanded.append(kwargs)

    class DAG:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

        def __enter__(self) -> DAG:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    class Variable:
        @staticmethod
        def get(name: str) -> str:
            return f"token-from-{name}"

    class Connection:
        login = "key-id"
        password = "secret-key"
        extra_dejson: ClassVar[dict[str, str]] = {
            "region_name": "eu-west-1",
            "endpoint_url": "http://minio:9000",
        }

    class BaseHook:
        @staticmethod
        def get_connection(conn_id: str) -> Connection:
            assert conn_id == "aws_default"
            return Connection()

    class AirflowException(Exception):
        pass

    class AirflowFailException(AirflowException):
        pass

    sdk = types.ModuleType("airflow.sdk")
    vars(sdk).update(DAG=DAG, BaseHook=BaseHook, Variable=Variable, task=lambda **kwargs: Task)
    exceptions = types.ModuleType("airflow.exceptions")
    vars(exceptions).update(
        AirflowException=AirflowException, AirflowFailException=AirflowFailException
    )
    monkeypatch.setitem(sys.modules, "airflow", types.ModuleType("airflow"))
    monkeypatch.setitem(sys.modules, "airflow.sdk", sdk)
    monkeypatch.setitem(sys.modules, "airflow.exceptions", exceptions)
    return expanded


def test_airflow_task_retries_only_what_a_rerun_can_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a stand-in for Airflow: exit 0 returns the summary, 1 and 130 raise a retryable
    AirflowException, 2 and 3 raise AirflowFailException (no retries)."""
    expanded = fake_airflow(monkeypatch)
    spec = importlib.util.spec_from_file_location("harvester_example_dag", AIRFLOW_DAG)
    assert spec is not None
    assert spec.loader is not None
    dag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dag)
    assert expanded == [{"shard": list(range(dag.SHARDS))}]
    exceptions = sys.modules["airflow.exceptions"]

    def exits(code: int) -> None:
        script = (
            "import os, sys; "
            "assert os.environ['MASSIVE_API_TOKEN'] == 'token-from-massive_api_token'; "
            "assert os.environ['AWS_ACCESS_KEY_ID'] == 'key-id'; "
            "assert os.environ['AWS_SECRET_ACCESS_KEY'] == 'secret-key'; "
            "assert os.environ['AWS_ENDPOINT_URL'] == 'http://minio:9000'; "
            f'print(\'{{"unresolved": 0, "exit_code": {code}}}\'); sys.exit({code})'
        )
        monkeypatch.setattr(dag, "shard_command", lambda shard: [sys.executable, "-c", script])

    exits(0)
    assert dag.harvest_shard(0) == {"unresolved": 0, "exit_code": 0}
    for code in sorted(NO_RETRY_CODES):
        exits(code)
        with pytest.raises(exceptions.AirflowFailException):
            dag.harvest_shard(0)
    for code in sorted(RETRY_CODES):
        exits(code)
        with pytest.raises(exceptions.AirflowException) as info:
            dag.harvest_shard(0)
        assert not isinstance(info.value, exceptions.AirflowFailException)
