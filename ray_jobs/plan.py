"""Check a job (or sweep) against a Ray cluster config before submitting it: does one worker fit a node
type, and how many nodes of which type will the autoscaler start? Launches nothing.

    python -m ray_jobs.plan --config configs/quickstart.yaml [--space tune_spaces/lr_grid.yaml] --cluster cluster.yaml \
        [--set ...]

Exit code 2 (with the problem and the fix) when the cluster cannot run it.
"""
import sys

from qlora.cli import config_parser, run
from qlora.config import load_config


def main(argv=None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--cluster", default="cluster.yaml", help="Ray cluster launcher YAML (default: cluster.yaml)")
    parser.add_argument("--space", help="search space YAML: plan the sweep's concurrent trials instead of one job")
    args = parser.parse_args(argv)

    def job():
        from qlora.jobs.plan import plan_job
        from qlora.search_space import SearchSpace
        cfg = load_config(args.config, args.overrides)
        space = load_config(args.space, model=SearchSpace) if args.space else None
        return plan_job(cfg, args.cluster, space)

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
