"""`ray job submit` against a real `ray start --head` cluster (token auth on) with a real `mlflow server`:
train and register; a bad config ends FAILED with its message in `ray job logs`; rank 0's metrics outlive a
tracking-server outage. The registered adapter evaluated by models:/NAME/VERSION: tests/e2e/test_readme_tour.py."""
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from qlora import checkpoint, tracking
from qlora.tracking import client

from conftest import ROOT
from servers import BIN, start_mlflow_server, start_ray_head


class Servers:
    def __init__(self, head, mlflow):
        self.head, self.mlflow = head, mlflow


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    mlflow_server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        head = start_ray_head(num_cpus=2)
    except Exception:
        mlflow_server.stop()
        raise
    s = Servers(head, mlflow_server)
    yield s
    s.head.stop()
    s.mlflow.stop()  # the outage test below may have replaced it


def submit(head, submission_id: str, *entrypoint: str, timeout=600) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--submission-id", submission_id,
           "--working-dir", ".", "--runtime-env", "runtime_env.yaml", "--", "python", "-m", *entrypoint]
    return subprocess.run(cmd, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=timeout)


def job_cli(head, *args: str) -> str:
    proc = subprocess.run([str(BIN / "ray"), "job", *args, "--address", head.dashboard], env=head.env,
                          capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_runtime_env_file_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv
    env = RuntimeEnv(**yaml.safe_load((ROOT / "runtime_env.yaml").read_text()))
    assert {".venv/", "runs/", "mlruns/", "mlflow.db"} <= set(env["excludes"])
    assert (ROOT / "runtime_env.yaml").read_text().startswith("# ray job submit --address http://127.0.0.1:8265")


def test_submitted_train_job_learns_logs_and_registers(servers, tiny_model_dir, tmp_path):
    """The quickstart's job on a tiny random Llama (2 workers, DDP over gloo), submitted to a token-auth cluster:
    the submission's mechanics (the uploaded working dir, outputs outside it, one MLflow run, the registry). The
    quickstart's own command on the real SmolLM2, and evaluating its registered version, run locally in
    tests/e2e/test_readme_tour.py."""
    head, mlflow_server = servers.head, servers.mlflow
    sets = [f"model.name={tiny_model_dir}", "train.max_steps=4", "train.log_every=2", "train.save_every=2",
            "train.learning_rate=2e-3",
            "data.max_samples=64", "data.system_prompt=Extract data.", "data.eval_max_samples=8",
            "evaluation.num_generate=2", "evaluation.max_new_tokens=24",
            f"scaling.storage_path={tmp_path / 'runs'}", f"tracking.uri={mlflow_server.uri}",
            "tracking.experiment=submitted", "tracking.register_as=people-extractor"]
    train = submit(head, "qlora-train-1", "ray_jobs.train", "--config", "configs/quickstart.yaml",
                   *[a for s in sets for a in ("--set", s)])
    assert train.returncode == 0, train.stdout[-4000:] + train.stderr[-2000:]
    assert "qlora-train-1' succeeded" in job_cli(head, "status", "qlora-train-1")
    result = last_json(train.stdout)  # logs streamed back, ending with the job's JSON line
    # A quiet console: our progress lines (step/total, loss, tokens/s, ETA; evaluation before and after), none of
    # the libraries' noise (weight-loading bars, bitsandbytes' kernels notice, FutureWarnings, Ray Train's echo of
    # every report, MLflow's type-hint and signature notices when the adapter is logged as a model).
    log = train.stdout + train.stderr
    assert "[qlora] step 2/4 (50%)" in log and "ETA" in log and "[qlora] step 4/4 (100%)" in log
    assert "[qlora] held-out evaluation before training (loss on 8 examples, greedy answers to 2)" in log
    for noise in ("Reporting training result", "Loading weights", "gemm_4bit_forward", "FutureWarning",
                  "Started training worker group", "Add type hints", "Failed to infer model signature"):
        assert noise not in log, noise
    assert result["registered_uri"] == "models:/people-extractor/1"
    before, after = result["metrics_before"], result["metrics_after"]
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert after["exact_match"] >= before["exact_match"]

    c = client(mlflow_server.uri)
    run = c.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray_submission_id"] == "qlora-train-1" and run.data.tags["ray_job_id"]
    assert len(c.get_metric_history(run.info.run_id, "loss")) >= 2
    assert len(c.search_runs([run.info.experiment_id])) == 1  # one run for the job, not one per worker
    assert run.data.params["lora.r"] == "16" and run.data.tags["quantization"] == "bnb-4bit-nf4-dq"
    assert "config.yaml" in {a.path for a in c.list_artifacts(run.info.run_id)}
    files = {a.path for a in c.list_artifacts(run.info.run_id, "adapter_model")}
    assert {"adapter_model/MLmodel", "adapter_model/artifacts"} <= files
    ckpt = Path(result["checkpoint"])  # in scaling.storage_path on the cluster, verified by its manifest
    checkpoint.verify(ckpt)
    assert {p.name for p in ckpt.iterdir()} >= {"adapter", "trainer_state.pt", "config.yaml", "manifest.json"}
    assert len([p for p in ckpt.parent.glob("checkpoint_*") if p.is_dir()]) == 2  # steps 2 and 4, both kept
    version = c.get_model_version("people-extractor", "1")
    assert version.run_id == run.info.run_id and version.tags["data_hash"] == run.data.tags["data_hash"]


def test_a_failing_submission_ends_failed_with_the_message(servers):
    head = servers.head
    bad = submit(head, "qlora-bad-1", "ray_jobs.train", "--config", "configs/quickstart.yaml", "--set", "lora.r=0")
    assert bad.returncode != 0
    assert "qlora-bad-1' failed" in job_cli(head, "status", "qlora-bad-1")
    logs = job_cli(head, "logs", "qlora-bad-1")
    assert "lora.r: Input should be greater than 0" in logs and '"exit_code": 2' in logs


def test_metrics_survive_a_tracking_server_outage(servers, capfd):
    """Rank 0's metric stream while the MLflow server is down: training is not held up (a dead server
    costs seconds), metrics are kept and sent once the server is back, and the log says so."""
    uri = servers.mlflow.uri
    c = client(uri)
    run_id = c.create_run(c.create_experiment("outage")).info.run_id
    sink = tracking.MetricsSink(uri, run_id)
    sink.log({"loss": 3.0}, 1)
    folder, port = servers.mlflow.folder, int(uri.rsplit(":", 1)[1])
    servers.mlflow.stop()
    started = time.time()
    sink.log({"loss": 2.0}, 2)
    sink.log({"loss": 1.5}, 3)
    assert time.time() - started < 60 and len(sink.pending) == 2
    assert "MLflow unreachable, 2 metrics buffered for retry" in capfd.readouterr().err
    servers.mlflow = start_mlflow_server(folder, port)  # same store, same address
    sink.log({"loss": 1.0}, 4)
    assert sink.pending == []
    assert [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [
        (1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]
