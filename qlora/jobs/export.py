"""The export job (ray_jobs.export): a saved adapter as a folder for peft / vLLM, or merged into a 16- or 32-bit
copy of its base, checked against the quantized base + adapter before anything is written.

Checks run in the job driver first (adapter found and intact, config valid, data readable, MLflow
reachable); the model work then runs on Ray with one training worker's resources, so on a cluster it lands
on a GPU node, not on the head. The adapter travels to the task as bytes (it is megabytes), so the task needs
no shared file system.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from qlora import adapters, checkpoint, console, distributed, modeling, runtime
from qlora.config import JobConfig
from qlora.errors import ConfigError, TrainingFailure
from qlora.files import writing_folder
from qlora.jobs.base import prepare_job
from qlora.model_source import resolve

# Max |logit difference| between the merged model and quantized base + adapter: float32 allows for
# quantized kernels that compute in bf16 (bitsandbytes' AVX512-BF16 CPU path: ~3e-3 on a tiny Llama),
# below the ~3e-2 of merging into the original instead of the dequantized weights.
MERGE_TOLERANCE = {"float32": 1e-2, "bfloat16": 0.25, "float16": 0.05}


MERGE_ORDER = ("bfloat16", "float32")  # --dtype auto: the smaller first


def export(ref: str, cfg: JobConfig, folder: Path, out: str, merge: bool, dtype: str) -> dict:
    target = Path(out).expanduser().resolve()
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"--out {target} exists and is not empty", "choose a new folder (nothing is overwritten)")
    if not merge:
        return _export_adapter(ref, cfg, folder, target)
    if dtype not in MERGE_TOLERANCE and dtype != "auto":
        raise ConfigError(f"--merge --dtype {dtype}: merging LoRA into {dtype} weights rounds every merged weight back "
                          f"to {dtype}, which loses most of the adapter's small update",
                          "merge to --dtype auto, bfloat16 or float32 (and quantize the merged model when you load it, e.g. "
                          "load_in_4bit), or drop --merge to export the adapter for use on the quantized base")
    prepare_job(cfg)
    result = runtime.on_worker(cfg, _merge_task, adapters.pack(folder), str(target), dtype)
    print(f"merged {result['dtype']} model written to {target}; max |logit difference| against base + adapter: "
          f"{result['max_logit_diff']:.2e}" + (f" (tried {result['tried']})" if len(result["tried"]) > 1 else ""),
          flush=True)
    return {"out": str(target), "format": "merged", **result}


def _export_adapter(ref: str, cfg: JobConfig, folder: Path, target: Path) -> dict:
    """The adapter files, the config it was trained with, a manifest and a model card: ready for peft/vLLM."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with writing_folder(target) as tmp:  # target is absent or empty (checked in export)
        shutil.copytree(folder / adapters.ADAPTER_DIR, tmp / adapters.ADAPTER_DIR)
        shutil.copy2(folder / adapters.CONFIG_FILE, tmp / adapters.CONFIG_FILE)
        (tmp / "README.md").write_text(
            f"# LoRA adapter\n\nFrom `{ref}`. Base model: `{cfg.model.name}`"
            f"{f' (GGUF file {cfg.model.gguf_file})' if cfg.model.gguf_file else ''}, trained on a "
            f"{cfg.quantization.bits}-bit base, LoRA r={cfg.lora.r} alpha={cfg.lora.alpha}.\n\n"
            "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"adapter\")\n```\n"
            "`config.yaml` is the full training config; `manifest.json` lists sizes and sha256 of every file.\n")
        checkpoint.write_manifest(tmp)
    print(f"adapter exported to {target}", flush=True)
    return {"out": str(target), "format": "adapter", "files": sorted(p.name for p in target.iterdir())}


def _merge_task(cfg_json: str, files: dict, out: str, dtype_name: str) -> dict:
    """Fold LoRA into a 16- or 32-bit copy of the base the adapter was trained on: the base is loaded as in
    training and a 4/8-bit one dequantized, so the merged model is the trained model (quantization error
    included) rather than the adapter on weights it never saw. Its logits are checked against the
    quantized base + adapter on a probe input before anything is written. dtype auto: bfloat16 if it passes
    that check, else float32."""
    console.quiet_libraries()
    cfg = JobConfig.from_json(cfg_json)
    ctx = distributed.context(cfg.scaling.use_gpu)
    source = resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = modeling.load_tokenizer(source, cfg)
    probe = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")], device=ctx.device)
    tried = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(adapters.unpack(files, Path(tmp)) / adapters.ADAPTER_DIR)
        for name in MERGE_ORDER if dtype_name == "auto" else (dtype_name,):
            merged, tried[name] = _merged(cfg, source, tokenizer, adapter, getattr(torch, name), probe, ctx.device)
            if tried[name] <= MERGE_TOLERANCE[name]:
                break
    if tried[name] > MERGE_TOLERANCE[name]:
        raise TrainingFailure(f"merged model disagrees with base + adapter in {name} (max |logit diff| "
                              f"{tried[name]:.3g}, allowed {MERGE_TOLERANCE[name]}): {name} rounds this model's "
                              "merged weights too coarsely; export with --dtype float32 (or --dtype auto, which "
                              "falls back to it)")
    target = Path(out)
    with writing_folder(target) as tmp_out:  # target is absent or empty (checked in export)
        merged.save_pretrained(tmp_out, safe_serialization=True)
        tokenizer.save_pretrained(tmp_out)
    return {"dtype": name, "max_logit_diff": tried[name], "tried": tried,
            "bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file())}


def _merged(cfg: JobConfig, source, tokenizer, adapter: str, dtype, probe, device):
    """(base + adapter merged in `dtype`, max |logit difference| on `probe` against quantized base + adapter)."""
    base = modeling.load_base_model(cfg, source, device, tokenizer.pad_token_id)
    trained = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        expected = trained(input_ids=probe).logits.float()
    base = trained.unload()  # the base's own layers back, to dequantize
    if cfg.quantization.bits != 16:
        base = base.dequantize(dtype=dtype)
    model = PeftModel.from_pretrained(base.to(dtype), adapter)
    with torch.no_grad():
        merged = model.merge_and_unload().eval()
        merged.config.use_cache = True
        return merged, (merged(input_ids=probe).logits.float() - expected).abs().max().item()
