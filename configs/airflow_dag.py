"""harvester as an Airflow DAG: one mapped task per shard, each ``harvester run --shard K/N``.

Dynamic task mapping (``.expand``) makes SHARDS task instances from one definition; each
harvests the ids whose stable hash falls in its shard, into one dataset in S3 (workers share
no disk; each shard's lease object in the bucket keeps a second run of it out). Retrying a
task resumes its shard from the committed rows. Workers need ``pip install 'harvester[s3]'``.

The token is read from the Airflow Variable ``massive_api_token`` (or a secrets backend
behind it) at run time and passed in the environment, never on the command line. S3
credentials come the same way from the Airflow connection ``aws_default`` (type Amazon Web
Services: login = access key id, password = secret key, extra ``region_name`` and, for MinIO
and other S3-compatible stores, ``endpoint_url``); with no such connection harvester uses
the worker's own AWS identity (instance role, IRSA, ~/.aws with AWS_PROFILE).

Exit codes decide retries: 1 (some ids unresolved) and 130 (stopped by a signal) are finished
by running the same command again, so the task fails and Airflow retries it, as it does 4
(output not written) and 5 (nothing answered at --base-url: an outage may end); 2 (bad input or
settings) and 3 (token or credit refused) fail at once without retries, because a rerun cannot
succeed until a person fixes the cause.

When Airflow stops a task (timeout, "mark failed") it sends SIGTERM to the task's process
group, harvester included, then SIGKILL after ``killed_task_cleanup_time`` (60 s by default):
keep that above 30 s so harvester can finish its requests in flight (10 s) and commit.

tests/test_orchestration.py reads this file with ``ast`` (Airflow is not a dependency of
harvester) and checks every shard's command line with harvester's own parser.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

try:  # Airflow 3
    from airflow.sdk import DAG, BaseHook, Variable, task
except ImportError:  # Airflow 2.x
    from airflow import DAG
    from airflow.decorators import task
    from airflow.hooks.base import BaseHook
    from airflow.models import Variable
from airflow.exceptions import AirflowException, AirflowFailException

SHARDS = 8
# Requests/s for all shards together: --rate is per process, so each shard gets a share.
TOTAL_RATE = 400.0
COMMAND = (
    "harvester run --ids s3://harvest-data/input/ids.csv.gz --out s3://harvest-data/completions "
    "--shard {shard}/{shards} --rate {rate} --concurrency 32 --json --no-progress"
)
AWS_CONN_ID = "aws_default"
NO_RETRY = {2: "bad input or settings", 3: "the API refused the token or the credit ran out"}

log = logging.getLogger(__name__)


def shard_command(shard: int) -> list[str]:
    """The command line of one shard."""
    return shlex.split(COMMAND.format(shard=shard, shards=SHARDS, rate=TOTAL_RATE / SHARDS))


def aws_environment() -> dict[str, str]:
    """The AWS_* variables of the ``aws_default`` connection ({} when there is none: the
    worker's own AWS identity then applies)."""
    try:
        conn = BaseHook.get_connection(AWS_CONN_ID)
    except Exception:  # no such connection (Airflow raises its own not-found error)
        return {}
    extra = conn.extra_dejson
    env = {
        "AWS_ACCESS_KEY_ID": conn.login or "",
        "AWS_SECRET_ACCESS_KEY": conn.password or "",
        "AWS_REGION": extra.get("region_name", ""),
        "AWS_ENDPOINT_URL": extra.get("endpoint_url", ""),
    }
    return {name: value for name, value in env.items() if value}


def harvest_shard(shard: int) -> dict[str, Any]:
    """Run one shard to its end; return its JSON summary (an XCom), or fail by exit code."""
    env = {
        **os.environ,
        **aws_environment(),
        "MASSIVE_API_TOKEN": Variable.get("massive_api_token"),
    }
    with subprocess.Popen(
        shard_command(shard),
        env=env,
        stdout=subprocess.PIPE,  # one JSON summary
        stderr=subprocess.PIPE,  # progress and errors, streamed into the task log
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        for line in proc.stderr:
            log.info("shard %d/%d: %s", shard, SHARDS, line.rstrip())
        output = proc.stdout.read()
    code = proc.returncode
    summary: dict[str, Any] = json.loads(output) if output.strip() else {}
    if code in NO_RETRY:
        raise AirflowFailException(f"harvester exit {code}: {NO_RETRY[code]}; not retrying")
    if code != 0:
        unresolved = summary.get("unresolved", "?")
        raise AirflowException(f"harvester exit {code} ({unresolved} ids unresolved); retrying")
    return summary


harvest = task(
    task_id="harvest_shard",
    retries=5,
    retry_delay=timedelta(minutes=2),
    retry_exponential_backoff=True,
    execution_timeout=timedelta(hours=12),
)(harvest_shard)

with DAG(
    dag_id="harvester",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    # Two DAG runs at once would run the same shards into one directory; harvester's shard
    # lease would make the second run's tasks exit 2.
    max_active_runs=1,
    max_active_tasks=SHARDS,
    tags=["harvester"],
):
    harvest.expand(shard=list(range(SHARDS)))
