"""Jobs on a saved adapter: evaluate, generate, export (adapter folder, or merged 16-bit model).

Checks run in the job driver first (adapter found and intact, config valid, data readable, MLflow
reachable); the model work then runs as one Ray task with one training worker's resources, so on a
cluster it lands on a GPU node, not on the head. The adapter travels to the task as bytes (it is
megabytes), so the task needs no shared file system.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from qlora import adapters, checkpoint, console, driver, evaluation, preflight, tasks, tracking
from qlora.config import JobConfig, apply_override, load_config
from qlora.errors import ConfigError, TrainingFailure, UserError
from qlora.files import writing_folder


def load_job(ref: str, config_path: str | None, overrides: list[str]) -> tuple[Path, JobConfig]:
    """The adapter folder and the config to use: --config if given, else the adapter's own, plus --set."""
    given = load_config(config_path, overrides) if config_path else None
    uri = given.tracking.uri if given else _override_value(overrides, "tracking.uri")
    folder = adapters.resolve(ref, uri)
    own = adapters.read_config(folder, overrides if not given else [])
    return folder, tasks.for_config(given).with_adapter(given, own) if given else own


def _override_value(overrides: list[str], key: str):
    """The value `--set` overrides give `key` (parsed as the config loader parses them), or None."""
    raw: dict = {}
    for item in overrides:
        apply_override(raw, item)
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def on_worker(cfg: JobConfig, fn, *args):
    """Run fn(*args) as one Ray task sized like one training worker; user errors come back as they are."""
    import ray
    from ray.exceptions import RayTaskError

    preflight.check_compute(cfg)
    preflight.check_ray_address(cfg.scaling.ray_address)
    local = driver.connect_ray(cfg.scaling.ray_address)
    task = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0,
                      resources=cfg.scaling.resources_per_worker or None,
                      accelerator_type=cfg.scaling.accelerator_type, max_retries=0)(fn)
    try:
        return ray.get(task.remote(driver.worker_config(cfg).to_json(), *args))
    except RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise TrainingFailure(f"{fn.__name__} failed: {type(e.cause).__name__}: {e.cause}") from None
    finally:
        if local:
            ray.shutdown()


# ---- evaluate ---------------------------------------------------------------------------------------

def evaluate(ref: str, cfg: JobConfig, folder: Path, out: str | None) -> dict:
    job = driver.prepare_job(cfg)  # data and model checks before Ray
    uri = driver.tracking_target(cfg)
    started = time.time()
    if not job.data_plan.needs_ray:  # cached, or small enough for this process: bad records fail before Ray
        driver.ensure_data(job)
    local = job.data is None and driver.connect_ray(cfg.scaling.ray_address)  # a Ray Data preparation first
    try:
        cache = driver.ensure_data(job).data.cache
        if cfg.scaling.num_workers > 1:  # the held-out set split over Ray Train workers, as training evaluates
            result = _evaluate_on_workers(cfg, adapters.pack(folder), cache)
        else:
            result = on_worker(cfg, _evaluate_task, adapters.pack(folder), cache)
    finally:
        if local:
            import ray
            ray.shutdown()
    metrics, predictions = result["metrics"], result["predictions"]
    print("held-out metrics: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    for p in predictions[:3]:
        if "label" in p:  # a classifier
            print(f"  record {p['record']}: label {p['label']}, predicted {p['predicted']} "
                  f"(p={max(p['probabilities']):.3f})")
        else:
            print(f"  prompt: {p['prompt'][-120:]!r}\n  answer: {p['answer']!r}\n  reference: {p['reference']!r}")
    run_id = None
    with tempfile.TemporaryDirectory() as tmp:
        folder_out = Path(out) if out else Path(tmp)
        evaluation.write_results(folder_out, metrics, predictions)
        if uri:
            trained_on = adapters.read_config(folder).data.path
            run_id = tracking.start_run(uri, cfg.tracking.experiment, f"eval-{Path(ref).name or ref}", {}, {
                "evaluated_adapter": ref, "data_hash": job.data.data_hash, "eval_data": cfg.data.eval_path or cfg.data.path,
                "adapter_trained_on": trained_on})
            c = tracking.client(uri)
            tracking.MetricsSink(uri, run_id).log(metrics, 0)
            c.log_artifacts(run_id, str(folder_out))
            c.set_terminated(run_id, "FINISHED")
    return {"metrics": metrics, "eval_records": len(job.data.eval), "mlflow_run_id": run_id,
            "out": str(Path(out).resolve()) if out else None, "seconds": round(time.time() - started, 1)}


def _evaluate_task(cfg_json: str, files: dict, data_cache: str) -> dict:
    console.quiet_libraries()
    from qlora import distributed
    cfg = JobConfig.from_json(cfg_json)
    return _evaluate(cfg, files, distributed.context(cfg.scaling.use_gpu), data_cache)


def _evaluate(cfg: JobConfig, files: dict, ctx, data_cache: str) -> dict:
    """Metrics over every rank, and all predictions in record order (on each rank); one process or a
    Ray Train worker group alike: each rank takes its share of the held-out records."""
    from qlora import distributed, multiple_choice
    from qlora.data.pipeline import open_prepared
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = adapters.load_for_inference(cfg, adapters.unpack(files, Path(tmp)), ctx.device)
    data = open_prepared(data_cache)
    predictions: list[dict] = []
    metrics = tasks.for_config(cfg).evaluate(model, data.eval, tokenizer, cfg, ctx,
                                             multiple_choice.prepare(cfg, tokenizer), predictions)
    return {"metrics": metrics, "predictions": distributed.gather_shards(predictions, ctx)}


def _evaluate_on_workers(cfg: JobConfig, files: dict, data_cache: str) -> dict:
    """_evaluate_task on `scaling.num_workers` Ray Train workers (the training job's resources)."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from qlora import distributed, plan

    def loop(config: dict) -> None:
        console.quiet_libraries()
        job_cfg = JobConfig.from_json(config["cfg"])
        ctx = distributed.context(job_cfg.scaling.use_gpu)
        result = _evaluate(job_cfg, config["files"], ctx, config["data_cache"])
        with tempfile.TemporaryDirectory() as tmp:  # Ray Train v2 keeps only what comes with a checkpoint
            checkpoint = None
            if ctx.is_writer:  # every rank has the gathered result; one writes it
                (Path(tmp) / "result.json").write_text(json.dumps(result))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({}, checkpoint=checkpoint)

    preflight.check_compute(cfg)
    preflight.check_ray_address(cfg.scaling.ray_address)
    local = driver.connect_ray(cfg.scaling.ray_address)
    trainer = TorchTrainer(loop, train_loop_config={"cfg": driver.worker_config(cfg).to_json(), "files": files,
                                                    "data_cache": data_cache},
                           scaling_config=ScalingConfig(**plan.scaling_kwargs(cfg.scaling)),
                           run_config=RunConfig(name=f"eval-{time.strftime('%Y%m%d-%H%M%S')}",
                                                storage_path=driver.storage_root(cfg),
                                                logging_config=LoggingConfig(log_level=console.ray_train_log_level())))
    try:
        with trainer.fit().checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / "result.json").read_text())
    except Exception as e:  # Ray wraps the worker's exception
        raise driver.worker_error(e, "evaluation") from None
    finally:
        if local:
            ray.shutdown()


# ---- generate ---------------------------------------------------------------------------------------

def generate(cfg: JobConfig, folder: Path, prompts: list[str], max_new_tokens: int | None,
             compare_base: bool = False) -> dict:
    """Greedy answers of the adapter; with `compare_base` also the base model's own (the adapter switched off:
    the same loaded weights, so the difference is the adapter's)."""
    if not prompts:
        raise ConfigError("no prompts to generate for", "pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if not tasks.for_config(cfg).can_generate:
        raise ConfigError("this adapter is a sequence classifier: it predicts classes and generates no text",
                          "use python -m ray_jobs.evaluate (metrics and predictions.jsonl) or the MLflow model's "
                          "predict()")
    driver.prepare_job(cfg)
    out = on_worker(cfg, _generate_task, adapters.pack(folder), prompts,
                    max_new_tokens or cfg.evaluation.max_new_tokens, compare_base)
    for i, (p, c) in enumerate(zip(prompts, out["completions"])):
        print(f"> {p}\n{c}\n" + (f"  (base model: {out['base_completions'][i]})\n" if compare_base else ""), flush=True)
    return out


def _generate_task(cfg_json: str, files: dict, prompts: list[str], max_new_tokens: int, compare_base: bool) -> dict:
    console.quiet_libraries()
    from qlora import distributed
    cfg = JobConfig.from_json(cfg_json)
    ctx = distributed.context(cfg.scaling.use_gpu)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = adapters.load_for_inference(cfg, adapters.unpack(files, Path(tmp)), ctx.device)
    task = tasks.for_config(cfg)
    out = {"completions": task.predict(model, tokenizer, cfg, prompts, max_new_tokens)}
    if compare_base:
        with model.disable_adapter():
            out["base_completions"] = task.predict(model, tokenizer, cfg, prompts, max_new_tokens)
    return out


def read_prompts(path: str) -> list[str]:
    """One prompt per line, or JSON lines with a "prompt" field."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ConfigError(f"--prompts-file {path} cannot be read ({e.strerror})", "give an existing text file") from None
    if lines and lines[0].lstrip().startswith("{"):
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"--prompts-file {path}: a JSON line has no \"prompt\" field ({e})",
                              "write one {\"prompt\": ...} object per line, or plain text lines") from None
    return lines


# ---- export -----------------------------------------------------------------------------------------

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
    driver.prepare_job(cfg)
    result = on_worker(cfg, _merge_task, adapters.pack(folder), str(target), dtype)
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
    import torch

    from qlora import distributed, modeling
    from qlora.model_source import resolve
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
    import torch
    from peft import PeftModel

    from qlora import modeling
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
