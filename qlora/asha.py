"""What ASHA sees of a sweep, kept the same through interruptions: its rung scores across a sweep driver crash,
and a trial's scored reports only.

Ray Tune does not save a scheduler's state with the experiment (ray-project/ray#30838): `Tuner.restore`
rebuilds ASHA from the pickle written when the sweep started, so every score recorded at the rungs is
lost and a resumed sweep stops nothing that it would have stopped without the crash. This scheduler
writes its rungs to a JSON file beside Tune's experiment state after every decision and reads them back
the first time the resumed sweep calls it (trial ids survive a restore).

A trial reports to Ray Train at every log step (scored: the held-out metric, so ASHA can compare) and also where
it checkpoints unscored: on a preemption notice, or a save step between evaluations. Ray's TuneReportCallback
forwards every report to Tune, which ends the whole sweep on one without the metric ("did not include the
specified metric"); forwarded under TuneConfig's loose checking they would still advance `training_iteration`, the
rungs' clock, and move ASHA's decisions. ScoredReportsToTune forwards the scored ones only; the checkpoints stay
registered with Ray Train, which resumes the trial from them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler


class PersistentASHA(ASHAScheduler):
    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self._state_file = state_file
        self._loaded = False

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self._state_file)
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        for bracket, rungs in zip(self._brackets, saved, strict=True):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, rungs, strict=True):
                if milestone != saved_milestone:
                    raise RuntimeError(f"{path} was written by an ASHA with other milestones; delete it to resume")
                recorded.update(saved_recorded)

    def _save(self) -> None:
        rungs = [[[milestone, {t: float(v) for t, v in recorded.items()}] for milestone, recorded in b._rungs]
                 for b in self._brackets]
        tmp = f"{self._state_file}.tmp"
        Path(tmp).write_text(json.dumps(rungs))
        os.replace(tmp, self._state_file)  # a crash mid-write leaves the previous state, not half a file

    def on_trial_add(self, tune_controller, trial):
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


class ScoredReportsToTune(TuneReportCallback):
    """Ray Train reports to Tune, only those that carry `metric`."""

    def __init__(self, metric: str):
        super().__init__()
        self._metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if self._metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)
