"""How a run that fails for good ends: a NaN loss stops it at the step it happened, with that step named, exit code 1,
the last good checkpoint kept and the MLflow run FAILED, at once (Ray Train does not restart a worker's own error:
it would only repeat). The real command line, in this test process, on its shared local Ray cluster."""
import json

from qlora import checkpoint
from qlora.tracking import client
from ray_jobs import train

from conftest import ROOT


def test_a_nan_loss_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(ray_cluster, tiny_model_dir,
                                                                                  tmp_path, capsys):
    # A learning rate of 1e30 (after the quickstart's 2 warm-up steps) turns the weights into NaN at step 3.
    storage, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"model.name={tiny_model_dir}", "train.learning_rate=1e30", "train.save_every=1", "train.log_every=1",
            "train.max_steps=4", "data.max_samples=32", "evaluation.generate=false", "scaling.num_workers=1",
            f"scaling.storage_path={storage}", f"tracking.uri={uri}", "tracking.experiment=nan",
            "tracking.run_name=nan-run"]
    code = train.main(["--config", str(ROOT / "configs" / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out
    error = json.loads(out.strip().splitlines()[-1])
    assert code == error["exit_code"] == 1, out[-3000:]
    assert error["error"].startswith("loss became nan at step 3; the last good checkpoint")
    newest = max(p for p in (storage / "nan-run").glob("checkpoint_*") if p.is_dir())
    checkpoint.verify(newest)
    assert checkpoint.load_trainer_state(newest)["state"]["step"] == 2
    c = client(uri)
    assert [r.info.status for r in c.search_runs([c.get_experiment_by_name("nan").experiment_id])] == ["FAILED"]
