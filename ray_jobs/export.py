"""Export a saved adapter: the adapter folder (for peft / vLLM), or --merge into a 16-bit model.

    python -m ray_jobs.export --adapter models:/NAME/VERSION --out exported/NAME [--merge [--dtype auto]]
"""
import sys

from qlora.cli import adapter_parser, run


def main(argv=None) -> int:
    parser = adapter_parser(__doc__)
    parser.add_argument("--out", required=True, help="a new (or empty) folder to write")
    parser.add_argument("--merge", action="store_true",
                        help="fold LoRA into the base weights and write a standalone safetensors model")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32", "nf4", "int8"], default="auto",
                        help="weights dtype of the merged model; auto: bfloat16 if its logits match base + adapter "
                        "within tolerance, else float32 (nf4 and int8 are refused: see the error)")
    args = parser.parse_args(argv)

    def job():
        from qlora import adapters
        from qlora.jobs import export
        folder, cfg = adapters.load_job(args.adapter, args.config, args.overrides)
        return export.export(args.adapter, cfg, folder, args.out, args.merge, args.dtype)

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
