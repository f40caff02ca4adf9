"""Sweep LoRA rank, learning rate, data size (any config path) with Ray Tune; each trial a Ray Train run.

    python -m ray_jobs.sweep --config configs/quickstart.yaml --space tune_spaces/rank_lr_datasize.yaml \
        [--set ...] [--space-set num_samples=1 ...] [--resume]
"""
import sys
from pathlib import Path

from qlora.cli import config_parser, run
from qlora.config import load_config


def main(argv=None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/rank_lr_datasize.yaml")
    parser.add_argument("--space-set", dest="space_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a search-space value, e.g. --space-set num_samples=1 or "
                        "--space-set max_concurrent_trials=4 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    args = parser.parse_args(argv)

    def job():
        from qlora.search_space import SearchSpace
        from qlora.jobs.sweep import sweep
        cfg = load_config(args.config, args.overrides)
        space = load_config(args.space, args.space_overrides, model=SearchSpace)
        name = cfg.tracking.run_name or f"sweep-{Path(args.config).stem}-{Path(args.space).stem}"
        return sweep(cfg, space, name, resume=args.resume)

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
