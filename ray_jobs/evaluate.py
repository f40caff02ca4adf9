"""Evaluate a saved adapter on held-out data: loss, perplexity, exact match (plus final_number_match and
mc_accuracy when evaluation.answer_metric / evaluation.multiple_choice_path ask); predictions.jsonl + metrics.json.

    python -m ray_jobs.evaluate --adapter models:/NAME/VERSION [--config configs/X.yaml] [--set ...] [--out DIR]
"""
import sys

from qlora.cli import adapter_parser, run


def main(argv=None) -> int:
    parser = adapter_parser(__doc__)
    parser.add_argument("--out", help="also write metrics.json and predictions.jsonl here")
    args = parser.parse_args(argv)

    def job():
        from qlora import adapters
        from qlora.jobs import evaluate
        folder, cfg = adapters.load_job(args.adapter, args.config, args.overrides)
        return evaluate.evaluate(args.adapter, cfg, folder, args.out)

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
