"""Job drivers, one per entry point in ray_jobs/ (train, dry run, sweep, evaluate, generate, export, plan), on the
shared steps of jobs/base.py. They run in the Ray job's driver process: cheap checks first, then the Ray layers
(qlora/train_driver.py, qlora/worker.py, Tune inside jobs/sweep.py) and the MLflow run."""
