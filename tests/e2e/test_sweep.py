"""Search-space schema, and a real Ray Tune sweep (Ray Train inside Tune, ASHA, MLflow parent/child runs)
that is killed mid-way and resumed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora.config import load_config
from qlora.errors import ConfigError
from qlora.search_space import SearchSpace, apply_params
from qlora.tracking import client

from conftest import ROOT

SPACES = sorted((ROOT / "tune_spaces").rglob("*.yaml"))


def test_every_shipped_space_loads_and_fits_the_config_its_command_names():
    assert len(SPACES) >= 3
    for path in SPACES:
        space = load_config(path, model=SearchSpace)
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python -m ray_jobs.sweep --config configs/"), path
        space.check_against(load_config(ROOT / first.split("--config ")[1].split()[0]))


def test_rank_lr_datasize_space_ties_alpha_to_rank():
    space = load_config(ROOT / "tune_spaces" / "rank_lr_datasize.yaml", model=SearchSpace)
    assert space.params["lora.r"].choice == [8, 16, 32, 64]
    assert space.params["train.learning_rate"].loguniform == (1e-5, 5e-4)
    cfg = apply_params(load_config(ROOT / "configs" / "quickstart.yaml"), {"lora.r": 32}, space.tied)
    assert cfg.lora.r == 32 and cfg.lora.alpha == 64


@pytest.mark.parametrize("params, message", [
    ({"lora.rank": {"choice": [8]}}, "'lora.rank' is not a config path"),
    ({"lora": {"choice": [8]}}, "'lora' is not a config path"),
    ({"lora.r": {"choice": [0, 8]}}, "lora.r=0 is not a valid value"),
    ({"data.fraction": {"uniform": [0.5, 1.5]}}, "data.fraction=1.5 is not a valid value"),
])
def test_bad_space_paths_and_values_are_named(tmp_path, params, message):
    base = load_config(ROOT / "configs" / "quickstart.yaml")
    with pytest.raises(ConfigError, match=message):
        SearchSpace.model_validate({"params": params}).check_against(base)


@pytest.mark.parametrize("space, message", [
    ({"params": {"lora.r": {"choice": [8], "grid": [8]}}}, "exactly one"),
    ({"params": {"train.learning_rate": {"loguniform": [0, 1]}}}, "low > 0"),
    ({"search": "optuna", "params": {"lora.r": {"grid": [8]}}}, "cannot take grid"),
    ({"params": {"lora.r": {"choice": [8]}}, "metrik": "x"}, "unknown key 'metrik'"),
])
def test_bad_space_schema(tmp_path, space, message):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match=message):
        load_config(p, model=SearchSpace)


def _sweep_cmd(tmp_path, resume=False):
    return [sys.executable, "-m", "ray_jobs.sweep", "--config", str(tmp_path / "job.yaml"),
            "--space", str(tmp_path / "space.yaml")] + (["--resume"] if resume else [])


def test_sweep_asha_stops_bad_trials_and_resume_reruns_nothing_finished(tmp_path, tiny_model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(ROOT / "data" / "people_json.jsonl"), "max_samples": 48, "eval_max_samples": 8,
                 "max_length": 128},
        # A checkpoint at every step, scored every second: unscored reports reach Ray Train but not Tune, whose
        # metric check would otherwise end the sweep on them (qlora.asha.ScoredReportsToTune).
        "train": {"max_steps": 4, "batch_size": 4, "log_every": 2, "save_every": 1},
        "evaluation": {"generate": False},
        "scaling": {"num_workers": 1, "storage_path": str(tmp_path / "runs")},
        "tracking": {"uri": uri, "experiment": "sweep", "run_name": "lr-sweep", "register_as": "sweep-best"}}))
    # One good learning rate and one that learns nothing: ASHA must stop the latter early.
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "search": "grid", "num_samples": 1, "max_concurrent_trials": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "params": {"train.learning_rate": {"grid": [1e-2, 1e-7]}}}))
    c = client(uri)

    def children():
        exp = c.get_experiment_by_name("sweep")
        return [] if exp is None else c.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")

    # Start the sweep, and stop its driver with Ctrl+C (SIGINT) part-way.
    proc = subprocess.Popen(_sweep_cmd(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    deadline = time.time() + 600
    # Kill once the second trial has started: the first has finished and Tune has recorded it as done.
    # After the resume, ASHA stops the second at its first report (worse than the first trial's).
    while time.time() < deadline and not (any(r.info.status == "FINISHED" for r in children())
                                          and len(children()) >= 2):
        assert proc.poll() is None, "sweep ended before it could be interrupted"
        time.sleep(2)
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 130 and stopped["error_type"] == "Interrupted", out[-3000:]
    assert "resume: run the same command with --resume" in stopped["error"]
    # Nothing left RUNNING in MLflow: the parent and the interrupted trial are KILLED, the finished one FINISHED.
    exp = c.get_experiment_by_name("sweep")
    assert {r.info.status for r in c.search_runs([exp.experiment_id])} == {"KILLED", "FINISHED"}
    finished_before = {r.data.tags["trial_id"]: r.info.end_time for r in children() if r.info.status == "FINISHED"}
    assert finished_before

    done = subprocess.run(_sweep_cmd(tmp_path, resume=True), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["trials"] == 2 and result["stopped_early"] == 1
    assert result["best"]["params"] == {"train.learning_rate": 1e-2}
    assert Path(result["best_adapter"], "adapter_model.safetensors").is_file()

    runs = children()
    by_trial = {}
    for r in runs:
        by_trial.setdefault(r.data.tags["trial_id"], []).append(r)
    assert len(by_trial) == 2 and all(len(v) == 1 for v in by_trial.values())  # one child per trial
    for trial, end in finished_before.items():  # finished trials were not run again
        assert by_trial[trial][0].info.end_time == end
    table = done.stdout[done.stdout.find("trial "):][:2000]
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}, (
        {t: v[0].info.status for t, v in by_trial.items()}, table)
    assert any(r.data.tags.get("stopped_early") == "true" for r in runs)
    parent = c.get_run(result["mlflow_parent_run_id"])
    names = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "curves.png", "eval_loss_vs_train.learning_rate.png", "best_config.yaml",
            "adapter_model"} <= names
    # Only the best trial's adapter is registered, from the parent run.
    versions = c.search_model_versions("name = 'sweep-best'")
    assert [v.run_id for v in versions] == [parent.info.run_id]
    best_cfg = load_config(Path(c.download_artifacts(parent.info.run_id, "best_config.yaml", str(tmp_path))))
    assert best_cfg.train.learning_rate == 1e-2


def test_search_algorithms_and_scheduler_are_built_from_the_space(tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from qlora.jobs.sweep import _tune_config
    space = SearchSpace.model_validate({"search": "optuna", "num_samples": 6, "max_concurrent_trials": 2,
                                        "time_budget_s": 60, "params": {"lora.r": {"choice": [8, 16]}}})
    tc = _tune_config(space, tmp_path)
    assert isinstance(tc.search_alg, OptunaSearch) and isinstance(tc.scheduler, ASHAScheduler)
    assert (tc.num_samples, tc.max_concurrent_trials, tc.time_budget_s, tc.metric) == (6, 2, 60, "eval_loss")
    space = SearchSpace.model_validate({"scheduler": {"type": "none"}, "params": {"lora.r": {"randint": [4, 9]}}})
    none = _tune_config(space, tmp_path)
    assert none.scheduler is None and none.search_alg is None


class _Trial:  # what ASHA reads of a trial: its id
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_asha_rungs_survive_a_driver_restart(tmp_path):
    """Ray Tune rebuilds schedulers empty on restore (ray#30838): a fresh ASHA continues a trial that the
    one before the crash would have stopped; ours reads the rungs back and stops it."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from qlora.asha import PersistentASHA
    state = tmp_path / "asha_rungs.json"
    kwargs = dict(metric="eval_loss", mode="min", time_attr="training_iteration", grace_period=1,
                  reduction_factor=2, max_t=100)
    before = PersistentASHA(str(state), **kwargs)
    good = _Trial("good")
    before.on_trial_add(None, good)
    assert before.on_trial_result(None, good, {"training_iteration": 1, "eval_loss": 1.0}) == TrialScheduler.CONTINUE
    before.on_trial_complete(None, good, {"training_iteration": 2, "eval_loss": 0.5})
    assert state.is_file()

    bad = {"training_iteration": 1, "eval_loss": 3.0}
    plain = ASHAScheduler(**kwargs)
    plain.on_trial_add(None, _Trial("bad"))
    assert plain.on_trial_result(None, _Trial("bad"), bad) == TrialScheduler.CONTINUE  # the Ray behaviour
    after = PersistentASHA(str(state), **kwargs)
    after.on_trial_add(None, _Trial("bad"))
    assert after.on_trial_result(None, _Trial("bad"), bad) == TrialScheduler.STOP
