"""The Tune driver: each trial is a full Ray Train run (TorchTrainer inside a Tune function trainable).

Workers report eval loss at every log step, forwarded to Tune (qlora.asha.ScoredReportsToTune), so ASHA can stop
bad trials mid-run. MLflow gets one parent run per sweep and one child run per trial (never one per worker).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from qlora import adapters, console, preflight, resources, runtime, tracking, train_driver
from qlora.asha import PersistentASHA, ScoredReportsToTune
from qlora.config import JobConfig, flatten
from qlora.errors import ConfigError, Interrupted, stop_signal
from qlora.jobs.base import ensure_data, finish, prepare_job, start_mlflow_run
from qlora.payload import WorkerPayload
from qlora.search_space import SearchSpace, apply_params, with_tied

STATE_FILE = "qlora_sweep.json"
TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})_")  # Tune's trial folders: run_trial_<id>_<index>_<params>_<time>


def trial_config(base: JobConfig, params: dict, space: SearchSpace) -> JobConfig:
    cfg = apply_params(base, params, space.tied)
    # Every report must carry the metric, or ASHA has nothing to compare; only the sweep's best adapter is
    # registered (by the parent run), not every trial's.
    return cfg.with_changes({"train.eval_every": cfg.train.log_every, "tracking.register_as": None})


def run_trial(config: dict, base_json: str, space_json: str, uri, parent_run_id, storage: str,
              sweep_name: str, verbose: bool = False) -> None:
    """Tune trainable: one trial = one TorchTrainer run, reporting to Tune through a callback."""
    if verbose:
        os.environ[console.VERBOSE_ENV] = "1"
    console.quiet_libraries()
    from ray import tune

    space = SearchSpace.model_validate_json(space_json)
    cfg = trial_config(JobConfig.from_json(base_json), config["params"], space)
    trial_id = tune.get_context().get_trial_id()
    name = f"{sweep_name}-trial-{trial_id}"
    job = ensure_data(prepare_job(cfg, storage))  # the sweep driver prepared it: a cache hit
    run_id = None
    if uri:
        existing = _child_runs(uri, cfg.tracking.experiment, parent_run_id, trial_id)
        run_id = existing[0].info.run_id if existing else start_mlflow_run(
            job, uri, name, {"mlflow.parentRunId": parent_run_id, "trial_id": trial_id})
        if existing:  # a trial resumed after the sweep was stopped (its run KILLED then) runs again
            tracking.client(uri).update_run(run_id, status="RUNNING")
    payload = WorkerPayload(cfg.to_json(), job.data.cache, uri, run_id, console.verbose(), storage_root=storage)
    result = train_driver.fit(cfg, payload, name, storage, callbacks=[ScoredReportsToTune(space.metric)],
                              in_tune_trial=True)
    finish(result, job, uri, run_id)


def prepare_data(cfg: JobConfig, space: SearchSpace, storage: str) -> None:
    """Prepare, before any trial starts, the data of every value the space gives data.* keys (choice and grid
    values: trials then open the cache); sampled continuous data values are prepared by their trial."""
    data_params = {k: d for k, d in space.params.items() if k.startswith("data.") and d.kind in ("choice", "grid")}
    variants = [{}]
    for key, dist in data_params.items():
        variants = [{**v, key: value} for v in variants for value in dist.args]
    for values in variants:
        ensure_data(prepare_job(apply_params(cfg, values, {}), storage))


def _child_runs(uri: str, experiment: str, parent: str, trial_id: str | None = None):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = f"tags.`mlflow.parentRunId` = '{parent}'" + (f" and tags.trial_id = '{trial_id}'" if trial_id else "")
    return c.search_runs([exp.experiment_id], filter_string=query)


def sweep(cfg: JobConfig, space: SearchSpace, name: str, resume: bool = False) -> dict:
    # Save Tune's experiment state on every loop: a trial that finished is never run again after a
    # driver crash (the state is a few KB; trials take minutes).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # Ctrl+C raises here instead of Tune returning a partial result as if the sweep had ended: the sweep's MLflow
    # runs are closed as KILLED and the resume is named (Interrupted).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    from ray import tune

    space.check_against(cfg)
    base = prepare_job(cfg)  # model, data sources and LoRA checks before the cluster is touched
    preflight.check(cfg)
    preflight.check_sweep_compute(cfg, resources.TRIAL_RESOURCES["CPU"])
    if not base.data_plan.needs_ray:  # small data: bad records fail before Ray
        ensure_data(base)
    storage = runtime.storage_root(cfg)
    uri = runtime.tracking_target(cfg)
    sweep_dir = Path(storage) / name
    state_path = sweep_dir / STATE_FILE
    if resume and not state_path.is_file():
        raise ConfigError(f"--resume: no sweep named {name} in {storage}", "drop --resume to start it, or use "
                          "the same --config, --space and tracking.run_name as the interrupted sweep")
    if not resume and state_path.is_file():
        raise ConfigError(f"a sweep named {name} already exists in {storage}",
                          "pass --resume to continue it, or set tracking.run_name to start a new one")
    with runtime.ray_connected(cfg.scaling.ray_address):
        prepare_data(cfg, space, storage)
        if resume:
            parent = json.loads(state_path.read_text())["mlflow_parent_run_id"]
            if uri and parent:  # KILLED when the sweep was stopped
                tracking.client(uri).update_run(parent, status="RUNNING")
        else:
            parent = tracking.start_run(uri, cfg.tracking.experiment, name, {**flatten(cfg), **{
                f"space.{k}": v.model_dump(exclude_none=True) for k, v in space.params.items()}},
                {"sweep": "true"}) if uri else None
            sweep_dir.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps({"mlflow_parent_run_id": parent}))
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base_json=runtime.worker_config(cfg).to_json(),  # Tune moves trials' cwd
                                 space_json=space.model_dump_json(), uri=uri, parent_run_id=parent, storage=storage,
                                 sweep_name=name, verbose=console.verbose()),
            resources.TRIAL_RESOURCES)  # the trial function only waits on its TorchTrainer; 0 CPUs is refused
        param_space = {"params": {k: d.to_tune() for k, d in space.params.items()}}
        if resume:
            # The space again: Tuner.restore otherwise forgets it, and a trial its search algorithm generates anew
            # (seen once in CI after a Ctrl+C) would get an empty config.
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, param_space=param_space,
                                       resume_unfinished=True, restart_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space, tune_config=_tune_config(space, sweep_dir),
                               run_config=tune.RunConfig(name=name, storage_path=storage))
        try:
            grid = tuner.fit()
        except (KeyboardInterrupt, SystemExit) as e:
            if not stop_signal(e):
                raise
            _close_interrupted(uri, cfg, parent)
            raise Interrupted(f"sweep {name} stopped (Ctrl+C or SIGTERM to the job); finished trials and Tune's state "
                              f"are kept in {sweep_dir}", "run the same command with --resume") from None
        return summarize(grid, cfg, space, uri, parent, name)


def _close_interrupted(uri: str | None, cfg: JobConfig, parent: str | None) -> None:
    """The sweep's parent run and its running trials' runs marked KILLED (not left RUNNING forever)."""
    if not (uri and parent):
        return
    for child in _child_runs(uri, cfg.tracking.experiment, parent):
        if child.info.status == "RUNNING":
            runtime.finish_mlflow_run(uri, child.info.run_id, "KILLED")
    runtime.finish_mlflow_run(uri, parent, "KILLED")


def _tune_config(space: SearchSpace, sweep_dir: Path):
    from ray import tune

    scheduler = None
    if space.scheduler.type == "asha":
        scheduler = PersistentASHA(str(sweep_dir / "asha_rungs.json"), time_attr="training_iteration",
                                   grace_period=space.scheduler.grace_period,
                                   reduction_factor=space.scheduler.reduction_factor, max_t=10_000)
    search_alg = None
    if space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch()
    return tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples, scheduler=scheduler,
                           search_alg=search_alg, max_concurrent_trials=space.max_concurrent_trials,
                           time_budget_s=space.time_budget_s)


def summarize(grid, cfg: JobConfig, space: SearchSpace, uri, parent, name: str) -> dict:
    """Table of trials, best config as YAML, MLflow parent artifacts; returns the final JSON facts."""
    import pandas as pd
    rows, curves = [], {}
    for r in grid:
        params = with_tied(r.config["params"], space.tied)
        m = r.metrics or {}
        # A trial that failed before its first report has no metrics: its folder name holds its id.
        trial_id = m.get("trial_id") or next(iter(TRIAL_ID.findall(Path(r.path).name)), Path(r.path).name)
        finished = "train_seconds" in m  # only the last step's report carries it
        status = "error" if r.error else ("finished" if finished else "stopped early")
        rows.append({"trial": trial_id, **params, space.metric: m.get(space.metric), "steps": m.get("step"),
                     "status": status})
        if r.metrics_dataframe is not None and "step" in r.metrics_dataframe:
            curves[trial_id] = r.metrics_dataframe
    table = pd.DataFrame(rows)
    if uri and parent:
        _close_trial_runs(uri, cfg, parent, table)
    done = table[table.status == "finished"].dropna(subset=[space.metric])
    if done.empty:
        raise ConfigError("no trial of the sweep finished", "see the trial errors above; widen the time budget")
    best = done.sort_values(space.metric, ascending=space.mode == "min").iloc[0]
    best_params = {k: best[k] for k in space.params}
    best_cfg = trial_config(cfg, {k: _plain(v) for k, v in best_params.items()}, space)
    print(table.to_string(index=False))
    print("\n# best config (python -m ray_jobs.train --config best.yaml)\n"
          + yaml.safe_dump(best_cfg.model_dump(), sort_keys=False))
    best_adapter = None
    if uri and parent:
        best_adapter = _log_parent(uri, parent, cfg, table, curves, space, best["trial"], best_cfg)
    return {"trials": len(table), "stopped_early": int((table.status == "stopped early").sum()),
            "best": {"params": {k: _plain(v) for k, v in best_params.items()}, space.metric: float(best[space.metric]),
                     "trial": best["trial"]},
            "best_adapter": best_adapter, "mlflow_parent_run_id": parent, "sweep": name}


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _close_trial_runs(uri, cfg: JobConfig, parent, table) -> None:
    """Trials never close their own run on an error: one that ASHA stops is cut off mid-fit, and its exception
    handler could still be running after Tune returned (seen: FAILED written over KILLED). The table decides."""
    c = tracking.client(uri)
    children = {r.data.tags.get("trial_id"): r for r in _child_runs(uri, cfg.tracking.experiment, parent)}
    for row in table.itertuples():
        child = children.get(row.trial)
        if child is None or child.info.status != "RUNNING":
            continue
        if row.status == "stopped early":
            c.set_tag(child.info.run_id, "stopped_early", "true")
            c.set_terminated(child.info.run_id, "KILLED")
        elif row.status == "error":
            c.set_terminated(child.info.run_id, "FAILED")


def _log_parent(uri, parent, cfg, table, curves, space, best_trial, best_cfg) -> str | None:
    import tempfile
    c = tracking.client(uri)
    children = {r.data.tags.get("trial_id"): r for r in _child_runs(uri, cfg.tracking.experiment, parent)}
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "trials.csv", index=False)
        _plots(Path(tmp), table, curves, space)
        (Path(tmp) / "best_config.yaml").write_text(yaml.safe_dump(best_cfg.model_dump(), sort_keys=False))
        c.log_artifacts(parent, tmp)
    best_run = children.get(best_trial)
    ckpt = best_run.data.tags.get("checkpoint_path") if best_run else None
    adapter = None
    if ckpt and os.path.isdir(ckpt):
        adapter = str(Path(ckpt) / adapters.ADAPTER_DIR)
        meta = {k: best_run.data.tags[k] for k in ("base_model", "quantization", "data_hash") if k in best_run.data.tags}
        adapters.log_to_mlflow(uri, parent, Path(ckpt), {**meta, "best_trial": best_trial}, cfg.tracking.register_as)
    c.log_metric(parent, f"best_{space.metric}", float(table.loc[table.trial == best_trial, space.metric].iloc[0]))
    c.set_terminated(parent, "FINISHED")
    return adapter


def _plots(folder: Path, table, curves: dict, space: SearchSpace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for path in space.params:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for status, group in table.groupby("status"):
            ax.scatter(group[path], group[space.metric], label=status)
        if path.endswith("learning_rate"):
            ax.set_xscale("log")
        ax.set_xlabel(path), ax.set_ylabel(space.metric), ax.legend()
        fig.tight_layout(), fig.savefig(folder / f"{space.metric}_vs_{path}.png"), plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for trial, df in curves.items():
        if space.metric in df:
            ax.plot(df["step"], df[space.metric], marker="o", label=trial)
    ax.set_xlabel("step"), ax.set_ylabel(space.metric), ax.legend(fontsize=6)
    fig.tight_layout(), fig.savefig(folder / "curves.png"), plt.close(fig)
