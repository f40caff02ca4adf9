"""Generate answers with a saved adapter on its quantized base model.

    python -m ray_jobs.generate --adapter models:/NAME/VERSION --prompt "..." [--prompt ...] [--prompts-file F]
        [--compare-base]   (also the base model's answer, the adapter switched off)
"""
import sys

from qlora.cli import adapter_parser, run


def main(argv=None) -> int:
    parser = adapter_parser(__doc__)
    parser.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or JSON lines with a \"prompt\" field")
    parser.add_argument("--max-new-tokens", type=int, help="default: evaluation.max_new_tokens of the config")
    parser.add_argument("--compare-base", action="store_true",
                        help="also answer with the base model alone (the adapter switched off), for comparison")
    args = parser.parse_args(argv)

    def job():
        from qlora import adapters
        from qlora.jobs import generate
        prompts = args.prompt + (generate.read_prompts(args.prompts_file) if args.prompts_file else [])
        folder, cfg = adapters.load_job(args.adapter, args.config, args.overrides)
        return generate.generate(cfg, folder, prompts, args.max_new_tokens, args.compare_base)

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
