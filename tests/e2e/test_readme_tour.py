"""The README's five-minute tour, command by command as the README prints it, on a new user's machine: a fresh
home folder (no ~/.ray, no token), a working folder holding only the project's configs, data and search spaces,
the defaults (a local Ray cluster started by the job, the MLflow store `mlflow.db` in that folder, the embedded
SmolLM2 in NF4). Small budgets are appended as `--set` (and `--space-set` for the sweep) and nothing else changes.

The commands are read from the README, so a command added there is run here; the `ray job submit` line (a GPU
config) is covered by tests/e2e/test_job_submit.py against a real `ray start` cluster."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from qlora.model_source import cache_root
from qlora.tracking import client

from conftest import ROOT

# What each command adds to the README's line: budgets for a 2-core machine, nothing else.
BUDGET = {
    "train": ["train.max_steps=2", "train.warmup_steps=0", "data.max_samples=64", "data.eval_max_samples=4",
              "evaluation.num_generate=2", "evaluation.max_new_tokens=16", "train.log_every=1"],
    "sweep": ["train.max_steps=1", "train.warmup_steps=0", "data.max_samples=64", "data.eval_max_samples=4",
              "evaluation.generate=false"],
    "evaluate": ["data.eval_max_samples=4", "evaluation.num_generate=2", "evaluation.max_new_tokens=16"],
}
SPACE_BUDGET = ["num_samples=1"]
NOISE = ("Reporting training result", "Loading weights", "gemm_4bit_forward", "FutureWarning",
         "Started training worker group", "Add type hints", "Failed to infer model signature")


def tour_commands() -> list[list[str]]:
    """The `python -m ray_jobs.*` commands of the README's tour block, continuation lines joined, comments cut."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A five-minute tour\n.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("python -m ray_jobs.")]


def with_budget(args: list[str]) -> list[str]:
    job = args[2].split(".")[-1]
    extra = [a for s in BUDGET.get(job, []) for a in ("--set", s)]
    if job == "sweep":
        extra += [a for s in SPACE_BUDGET for a in ("--space-set", s)]
    if "--dry-run" in args:
        extra = []
    return [sys.executable, *args[1:], *extra]


@pytest.fixture(scope="module")
def new_user(tmp_path_factory):
    """(working folder, environment) of a new user's machine with the project checked out."""
    work = tmp_path_factory.mktemp("checkout")
    for name in ("configs", "data", "tune_spaces"):
        (work / name).symlink_to(ROOT / name)
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "QLORA_CACHE": str(cache_root())}  # the converted SmolLM2 stays cached
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "QLORA_HOME", "RAY_AUTH_MODE"):
        env.pop(key, None)
    return work, env


def test_the_tour_runs_as_written_on_a_fresh_machine(new_user):
    work, env = new_user
    commands = tour_commands()
    jobs = [c[2] for c in commands]
    assert jobs == ["ray_jobs.train", "ray_jobs.train", "ray_jobs.sweep", "ray_jobs.evaluate", "ray_jobs.generate",
                    "ray_jobs.export"], jobs
    results = {}
    for args in commands:
        done = subprocess.run(with_budget(args), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{shlex.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        results[shlex.join(args)] = done
    dry, train, sweep, evaluate, generate, export = results.values()

    assert "GPU memory per worker, estimated" in dry.stdout

    # The main job: a quiet console with our progress lines, the adapter registered in the default store.
    log = train.stdout + train.stderr
    assert "[qlora] step 1/2 (50%)" in log and "ETA" in log and "[qlora] step 2/2 (100%)" in log
    assert "[qlora] held-out evaluation before training" in log
    for noise in NOISE:
        assert noise not in log, noise
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert result["registered_uri"] == "models:/people-extractor/1"
    assert result["metrics_after"]["eval_loss"] < result["metrics_before"]["eval_loss"]
    store = client(f"sqlite:///{work / 'mlflow.db'}")
    assert store.get_model_version("people-extractor", "1").run_id == result["mlflow_run_id"]
    assert store.get_run(result["mlflow_run_id"]).data.params["lora.r"] == "32"

    # The sweep fits its trial's driver and 2 workers of 0.99 CPU on this machine's 2 CPUs, and finishes.
    summary = json.loads(sweep.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 1 and summary["best"]["eval_loss"] > 0, summary

    # The registered adapter by name: evaluated, answering, merged with the default dtype.
    metrics = json.loads(evaluate.stdout.strip().splitlines()[-1])["metrics"]
    assert metrics["eval_loss"] == pytest.approx(result["metrics_after"]["eval_loss"], rel=1e-4)
    assert {p.name for p in (work / "eval").iterdir()} >= {"metrics.json", "predictions.jsonl"}
    answers = json.loads(generate.stdout.strip().splitlines()[-1])
    assert "Ana" in json.dumps(answers)
    merged = json.loads(export.stdout.strip().splitlines()[-1])
    assert (work / "exported" / "merged" / "config.json").is_file() and merged["dtype"], merged
