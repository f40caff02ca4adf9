"""Saved adapters as users name them, and loading one for inference.

A saved adapter is a folder with `adapter/` (peft's files) and `config.yaml` (the resolved JobConfig it
was trained with, so the base model, quantization and prompt format come with it). Users name one by
a local folder (a checkpoint printed by ray_jobs.train, or an exported folder), an MLflow run
(`runs:/RUN_ID/adapter_model`) or a registered version (`models:/NAME/VERSION`).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from qlora import checkpoint, tasks, tracking
from qlora.config import JobConfig, apply_override, load_config
from qlora.errors import ConfigError

ADAPTER_DIR, CONFIG_FILE = "adapter", "config.yaml"
MLFLOW_MODEL = "adapter_model"  # artifact path of the MLflow model inside a run
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
# What `mlflow.pyfunc.load_model` needs installed; the qlora package itself must be importable too.
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")


def resolve(ref: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding adapter/ and config.yaml for `ref`; MLflow references are downloaded."""
    if ref.startswith(("models:/", "runs:/")):
        folder = _download(ref, tracking.tracking_uri(tracking_uri))
    else:
        folder = Path(ref).expanduser()
        if (folder / "adapter_config.json").is_file():  # the adapter/ folder itself was given
            folder = folder.parent
    if not (folder / ADAPTER_DIR / "adapter_config.json").is_file() or not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"--adapter {ref}: {folder} is not a saved adapter (needs {ADAPTER_DIR}/adapter_config.json "
                          f"and {CONFIG_FILE})", "pass a checkpoint folder printed by ray_jobs.train, "
                          f"runs:/RUN_ID/{MLFLOW_MODEL} or models:/NAME/VERSION")
    if (folder / checkpoint.MANIFEST).is_file():
        try:
            checkpoint.verify(folder)
        except checkpoint.CorruptCheckpoint as e:
            raise ConfigError(f"--adapter {ref} is corrupt: {e}", "use an earlier checkpoint of the run") from None
    return folder


def _download(ref: str, uri: str) -> Path:
    tracking.check_reachable(uri)
    c = tracking.client(uri)  # also sets MLflow's telemetry switch before mlflow.artifacts is imported
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    dest = tempfile.mkdtemp(prefix="qlora-adapter-")
    try:
        if ref.startswith("models:/"):  # models:/NAME/VERSION or models:/NAME@ALIAS, looked up in this store
            spec = ref.removeprefix("models:/")
            name, alias = spec.split("@", 1) if "@" in spec else (spec.rsplit("/", 1)[0], None)
            mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, spec.rsplit("/", 1)[1])
            ref = c.get_model_version_download_uri(name, mv.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=dest, tracking_uri=uri))
    except (MlflowException, IndexError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise ConfigError(f"--adapter {ref} was not found in MLflow at {uri} ({str(e).splitlines()[0]})",
                          "check the model name and version in the MLflow UI, and tracking.uri") from None
    # A pyfunc model keeps the files it was given under artifacts/.
    return local / "artifacts" if (local / "MLmodel").is_file() else local


def read_config(folder: Path, overrides: list[str] = ()) -> JobConfig:
    return load_config(folder / CONFIG_FILE, overrides)


def pack(folder: Path) -> dict[str, bytes]:
    """The adapter's files as bytes, to ship to a Ray task on another node (adapters are megabytes)."""
    files = [folder / CONFIG_FILE, *sorted((folder / ADAPTER_DIR).rglob("*"))]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files if p.is_file()}


def unpack(files: dict[str, bytes], dest: Path) -> Path:
    for name, data in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return dest


def load_for_inference(cfg: JobConfig, folder: Path, device):
    """(peft model on the quantized base, tokenizer) in eval mode."""
    from peft import PeftModel

    from qlora import modeling
    from qlora.model_source import resolve as resolve_model
    source = resolve_model(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = modeling.load_tokenizer(source, cfg)
    base = modeling.load_base_model(cfg, source, device, tokenizer.pad_token_id)
    base.config.use_cache = True
    if cfg.model.attn_implementation == "flex_attention":  # a training kernel for packed rows (model.attn_implementation)
        base.set_attn_implementation("sdpa")
    model = PeftModel.from_pretrained(base, str(folder / ADAPTER_DIR))
    return model.eval(), tokenizer


def log_to_mlflow(uri: str, run_id: str, folder: Path, metadata: dict, register_as: str | None) -> dict:
    """Log the adapter as an MLflow pyfunc model (a model from code: no pickle) that records its base model,
    quantization and data hash, and optionally register it. Returns its model URI (and version)."""
    c = tracking.client(uri)
    import mlflow.pyfunc
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / MLFLOW_MODEL
        mlflow.pyfunc.save_model(
            str(saved), python_model=str(PYFUNC_CODE),
            artifacts={ADAPTER_DIR: str(folder / ADAPTER_DIR), "config": str(folder / CONFIG_FILE)},
            pip_requirements=[f"{p}=={version(p)}" for p in RUNTIME_PACKAGES],
            metadata={"flavor": "qlora-peft-adapter", **metadata})
        c.log_artifacts(run_id, str(saved), MLFLOW_MODEL)
    result = {"model_uri": f"runs:/{run_id}/{MLFLOW_MODEL}"}
    if register_as:
        from mlflow.exceptions import MlflowException
        try:
            c.create_registered_model(register_as)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{c.get_run(run_id).info.artifact_uri}/{MLFLOW_MODEL}"
        mv = c.create_model_version(register_as, source, run_id=run_id, tags=metadata)
        result.update(registered_model=register_as, version=mv.version,
                      registered_uri=f"models:/{register_as}/{mv.version}")
        print(f"[qlora] registered {result['registered_uri']}", file=sys.stderr, flush=True)
    return result


def load_job(ref: str, config_path: str | None, overrides: list[str]) -> tuple[Path, JobConfig]:
    """The adapter folder and the config to use: --config if given, else the adapter's own, plus --set."""
    given = load_config(config_path, overrides) if config_path else None
    uri = given.tracking.uri if given else _override_value(overrides, "tracking.uri")
    folder = resolve(ref, uri)
    own = read_config(folder, overrides if not given else [])
    return folder, tasks.for_config(given).with_adapter(given, own) if given else own


def _override_value(overrides: list[str], key: str):
    """The value `--set` overrides give `key` (parsed as the config loader parses them), or None."""
    raw: dict = {}
    for item in overrides:
        apply_override(raw, item)
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw
