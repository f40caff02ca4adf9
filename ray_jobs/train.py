"""Train a LoRA adapter on a quantized base model with Ray Train.

    python -m ray_jobs.train --config configs/quickstart.yaml [--set lora.r=32 ...] [--dry-run]
"""
import sys

from qlora.cli import config_parser, run
from qlora.config import load_config


def main(argv=None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true",
                        help="check config, data and LoRA targets, print statistics; train nothing")
    args = parser.parse_args(argv)

    def job():
        from qlora.jobs import dry_run, train  # heavy imports after argument parsing
        cfg = load_config(args.config, args.overrides)
        return dry_run.dry_run(cfg) if args.dry_run else train.train(cfg)

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
