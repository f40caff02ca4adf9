"""The sections of a job config: model, quantization, LoRA, data, training, evaluation, scaling, tracking.

Each forbids unknown keys and describes every field (docs/config.md is generated from these descriptions);
checks across fields of one section live with the section, checks across sections in job.py.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qlora.config.names import redact_uri

GPU_ONLY_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(
        "smollm2-135m",
        description="Base model: a hub id (org/name), a local HF folder, a .gguf file, or a short name "
        "of a packaged model (smollm2-135m).",
    )
    gguf_file: Optional[str] = Field(None, description="GGUF file inside `name` (a folder or hub repo).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo. Off unless set.")
    allow_pickle: bool = Field(False, description="Load pickle weights (*.bin / *.pt) from a local folder that has "
                               "no safetensors. Unpickling can run arbitrary code: off unless set; logged loudly.")
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = Field(
        "sdpa", description="Attention kernel. flex_attention (GPU only: torch has no CPU backward for it): "
        "packed rows get a block mask that skips the attention between their examples, where sdpa computes "
        "it under a dense mask (measured on an H200, 8B shape, packed alpaca rows, compiled layers: 13,049 vs "
        "11,234 tokens/s, 26.5 vs 29.5 GiB; benchmarks/RESULTS.md).")
    task: Literal["causal_lm", "sequence_classification", "preference"] = Field(
        "causal_lm", description="causal_lm: learn to generate the answers; sequence_classification: a linear "
        "head on the last token predicts one of num_labels classes (data.format classification or pairwise); "
        "preference: learn to prefer the chosen answer of each pair over the rejected one (data.format "
        "preference, the objective in the preference section: DPO, ORPO or SimPO).")
    num_labels: Optional[int] = Field(None, ge=2, description="Classes of a sequence_classification model; unset: "
                                      "the largest label in the data plus one.")
    pad_token: Literal["eos", "add"] = Field(
        "eos", description="Padding when the tokenizer has no pad token of its own. eos: reuse EOS (padding is "
        "masked out of attention and loss). add: add a [PAD] token (also when the pad token is EOS), grow the "
        "embeddings and set the new rows to the mean of the existing ones (QLoRA's recipe); the rows are "
        "re-created identically whenever the base is loaded, so the adapter does not carry them.")


class QuantizationSection(Section):
    bits: Literal[4, 8, 16] = Field(4, description="Base weights: 4 (bitsandbytes), 8 (LLM.int8) or 16 (plain LoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (QLoRA's double quantization).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Matmul dtype. auto: bfloat16 on GPUs that support it, float16 on older GPUs, "
        "float32 on CPU (bf16 without native support is ~18x slower there).",
    )
    cache_weights: bool = Field(True, description="Keep the 4-bit base this job quantizes in $QLORA_CACHE/quantized "
                                "(each node's local disk, keyed by the source's files and these settings) and load "
                                "it from there next time instead of quantizing again (qlora/weights_cache.py).")

    @model_validator(mode="after")
    def _four_bit_options(self):
        if self.bits != 4 and self.quant_type != "nf4":
            raise ValueError(f"quantization.quant_type={self.quant_type} is a 4-bit option but quantization.bits is "
                             f"{self.bits}: set quantization.bits=4, or remove quant_type")
        return self


class LoraSection(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module name suffixes to adapt, or all-linear (every linear layer but the head).")
    layers_to_transform: Optional[list[int]] = Field(None, description="Only adapt these layer indices.")
    skip_first_layers: int = Field(0, ge=0, description="Adapt every layer but the first N (turned into "
                                   "layers_to_transform once the model's layer count is known).")
    bias: Literal["none", "all", "lora_only"] = Field("none",
            description="Which biases train (peft's bias): none, all, or those of the adapted layers.")
    use_dora: bool = Field(False, description="DoRA (peft's use_dora): a trained magnitude per output feature of "
                           "every adapted layer, on top of the LoRA direction (one more vector per layer; each "
                           "forward pass also computes the adapted weight's column norms).")
    use_rslora: bool = Field(False, description="rsLoRA (peft's use_rslora): scale the LoRA branch by "
                             "alpha / sqrt(r) instead of alpha / r, which keeps high ranks learning.")
    init: Literal["default", "gaussian", "loftq", "pissa", "olora"] = Field(
        "default", description="How the LoRA weights start: default (A Kaiming-uniform, B zero: the model starts "
        "as the base), gaussian (A Gaussian, B zero), loftq (A and B fitted to the 4-bit quantization error of "
        "each layer, from the base's safetensors; quantization.bits=4 on GPUs only: peft fits it with CUDA). "
        "pissa and olora are refused: they rewrite the base weights, which a quantized base cannot hold.")

    @model_validator(mode="after")
    def _init_applies(self):
        if self.init in ("pissa", "olora"):
            raise ValueError(f"lora.init={self.init} starts the adapter from the base weights' principal (pissa) or "
                             "QR (olora) factors and subtracts them from the base, which peft cannot do on "
                             "bitsandbytes 4- or 8-bit weights, and which would tie the adapter to a rewritten "
                             "base: use lora.init=loftq (fitted to the 4-bit quantization error) or default")
        return self

    @model_validator(mode="after")
    def _targets_not_empty(self):
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules is an empty list: name modules (e.g. [q_proj, v_proj]) or use all-linear")
        if self.skip_first_layers and self.layers_to_transform is not None:
            raise ValueError("lora.skip_first_layers and lora.layers_to_transform both choose layers: keep one")
        return self


class KFoldSection(Section):
    folds: int = Field(..., ge=2, description="Number of folds K.")
    fold: int = Field(..., ge=0, description="The fold held out for evaluation (0 to K-1); the others train.")

    @model_validator(mode="after")
    def _fold_in_range(self):
        if self.fold >= self.folds:
            raise ValueError(f"data.kfold.fold={self.fold} is not below data.kfold.folds={self.folds}: "
                             f"choose a fold from 0 to {self.folds - 1}")
        return self


CLASSIFICATION_FORMATS = ("classification", "pairwise")
PREFERENCE_FORMATS = ("preference",)


class DataSection(Section):
    path: str = Field(..., description="Training data: a local .json/.jsonl/.csv/.tsv/.parquet file, a folder of "
                      "such shards, a datasets save_to_disk folder, a cloud URI (s3://, gs://, abfs://, file://: a "
                      "file or a prefix of shards), or a hub dataset id (org/name, with split / subset / revision).")
    split: str = Field("train", min_length=1, description="The split of a hub dataset or save_to_disk folder that "
                       "data.path names (datasets' split syntax, e.g. train or train[:10%]).")
    subset: Optional[str] = Field(None, description="The hub dataset's configuration (load_dataset's name).")
    revision: Optional[str] = Field(None, description="Hub dataset revision (branch, tag or commit).")
    eval_split: Optional[str] = Field(None, description="The split of data.eval_path when it is a hub dataset or "
                                      "save_to_disk folder; unset: data.split.")
    pipeline: Literal["auto", "ray_data", "in_process"] = Field(
        "auto", description="Where the data is prepared (read, checked, rendered, tokenized, packed) before "
        "training, once per cache key: ray_data, a Ray Data pipeline on the cluster's CPUs; in_process, in the "
        "job's driver; auto, ray_data for sources over 16 MiB. The result is the same either way.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text", "qa", "multiple_choice", "classification",
                    "pairwise", "preference"] = Field(
        "auto", description="alpaca: instruction/input/output; messages: [{role, content}]; sharegpt: "
        "conversations [{from, value}]; text: one `text` field trained whole; qa: question/answer (GSM8K), "
        "multiple_choice: question/choices/answer (letter or index), both rendered as alpaca; auto: chosen "
        "from the columns (generation formats only). With model.task=sequence_classification: classification (a "
        "text column and an integer label column) or pairwise (prompt, response_a, response_b and "
        "winner_model_a / winner_model_b / winner_tie flags -> labels 0 / 1 / 2). With model.task=preference: "
        "preference, a prompt with a chosen and a rejected answer in any of three layouts (prompt / chosen / "
        "rejected as strings or chat messages; chosen / rejected as whole conversations; the Chatbot Arena "
        "columns, ties dropped), rendered with the model's chat template.",
    )
    text_column: str = Field("text", min_length=1, description="format=classification: the column holding the text.")
    label_column: str = Field("label", min_length=1, description="format=classification: the column holding the "
                              "integer class (0 to num_labels-1).")
    kfold: Optional[KFoldSection] = Field(None, description="Hold out fold `fold` of a seeded K-fold split of `path` "
                                          "(stratified by label for classification) instead of eval_fraction.")
    eval_path: Optional[str] = Field(None, description="Held-out data, any source data.path takes; if unset, "
                                     "eval_fraction of `path` is held out.")
    eval_fraction: float = Field(0.1, gt=0, lt=1,
            description="Share of data.path held out (seeded) when neither eval_path nor kfold is set.")
    eval_max_samples: Optional[int] = Field(None, gt=0, description="Cap the held-out set (speed).")
    max_samples: Optional[int] = Field(None, gt=0, description="Use at most this many training records.")
    fraction: float = Field(1.0, gt=0, le=1, description="Use this fraction of the training records "
                            "(nested: a smaller fraction is a subset of a larger one with the same seed).")
    max_length: int = Field(512, ge=8, description="Tokens per example; longer examples are truncated.")
    max_source_length: Optional[int] = Field(
        None, ge=1, description="Cap each prompt (source) segment at this many tokens, keeping its end (the part "
        "next to the answer); QLoRA's source_max_len. Applied before max_length.")
    max_target_length: Optional[int] = Field(
        None, ge=1, description="Cap each answer (target) segment at this many tokens, keeping its start; QLoRA's "
        "target_max_len. Applied before max_length.")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens (QLoRA's train_on_source).")
    system_prompt: Optional[str] = Field(None, description="System message for alpaca records rendered as chat.")
    seed: int = Field(0, description="Seed of the eval split and of subsetting.")
    packing: bool = Field(False, description="Pack several training examples into each row of up to max_length "
                          "tokens (train.batch_size then counts rows). Each example keeps its own positions and "
                          "attends only to itself; the held-out loss stays unpacked.")

    @model_validator(mode="after")
    def _one_held_out_set(self):
        if self.kfold is not None and self.eval_path:
            raise ValueError("data.kfold and data.eval_path both choose the held-out set: keep one")
        return self

    @model_validator(mode="after")
    def _segment_caps_fit(self):
        if self.max_source_length and self.max_target_length and \
                self.max_source_length + self.max_target_length > self.max_length:
            total = self.max_source_length + self.max_target_length
            raise ValueError(f"data.max_source_length={self.max_source_length} + data.max_target_length="
                             f"{self.max_target_length} = {total} exceeds data.max_length={self.max_length}, which "
                             f"would cut answers anyway: raise data.max_length to {total}, or lower the two caps")
        return self


class PreferenceSection(Section):
    """The preference objective (model.task=preference); the formulas are in qlora/preference_loss.py."""
    loss: Literal["dpo", "orpo", "simpo"] = Field(
        "dpo", description="dpo: the sigmoid DPO loss against a reference policy, which is the same 4-bit base "
        "with the adapter turned off (one more forward pass per step, no second model); orpo: the SFT loss on "
        "the chosen answers plus orpo_lambda x the odds-ratio term, no reference; simpo: the length-normalised "
        "reward margin with a target margin simpo_gamma, no reference.")
    beta: float = Field(None, gt=0, description="Reward scale: DPO's KL strength (default 0.1, as in the DPO "
                        "paper and TRL) or SimPO's beta (default 2.0, the SimPO paper's range 2-2.5). Not used by orpo.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: the assumed share of flipped preference "
                                   "labels (conservative DPO); 0 is plain DPO.")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight of the odds-ratio term (the ORPO paper's "
                               "lambda, 0.1).")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin gamma (TRL's default 0.5).")

    @model_validator(mode="before")
    @classmethod
    def _default_beta(cls, raw):
        # beta's sensible scale depends on the loss: filled in before validation, so the config holds the value.
        if isinstance(raw, dict) and raw.get("beta") is None:
            raw = {**raw, "beta": 2.0 if raw.get("loss") == "simpo" else 0.1}
        return raw

    @model_validator(mode="after")
    def _options_of_the_loss(self):
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError(f"preference.label_smoothing applies to the dpo loss and preference.loss is "
                             f"{self.loss}: remove label_smoothing, or set preference.loss=dpo")
        return self


class TrainSection(Section):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of the LoRA weights.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine",
            description="Decay after warmup (transformers' get_scheduler).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many optimizer steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1,
            description="Warmup as a share of the total steps (instead of warmup_steps).")
    epochs: float = Field(1.0, gt=0,
            description="Passes over the training examples (fractions allowed); max_steps overrides.")
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(4, gt=0, description="Examples per worker per micro-batch.")
    gradient_accumulation: int = Field(1, gt=0,
            description="Micro-batches per optimizer step on each of scaling.num_workers workers (global batch = "
            "batch_size x this x scaling.num_workers, kept when an elastic run has fewer workers).")
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the gradient norm (over all workers) to this.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the optimizer.")
    loraplus_lr_ratio: Optional[float] = Field(
        None, gt=0, description="LoRA+: the LoRA B matrices (and 1-d trained vectors such as DoRA's magnitudes) "
        "train at train.learning_rate times this (the paper suggests 16), through optimizer parameter groups "
        "(peft's create_loraplus_optimizer grouping); unset: one learning rate.")
    optimizer: Literal["adamw", "sgd", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"] = Field(
        "adamw", description="paged_* and adamw_8bit are bitsandbytes CUDA optimizers (need scaling.use_gpu).")
    cpu_optimizer_fallback: Optional[Literal["adamw", "sgd"]] = Field(
        None, description="With scaling.use_gpu=false, train with this optimizer instead of a GPU-only "
        "train.optimizer (paged_*, adamw_8bit), so one config runs on a GPU cluster and on a laptop; the "
        "switch is printed. Unset: such a config is refused on CPU.")
    gradient_checkpointing: bool = Field(False,
            description="Recompute the decoder layers' activations in the backward pass (less memory, about a "
            "third more compute).")
    checkpointed_fraction: float = Field(1.0, gt=0, le=1, description="With gradient_checkpointing: recompute "
                                         "activations in this fraction of the decoder layers (spread evenly); the "
                                         "others keep theirs. Lower is faster and takes more memory.")
    kernels: Literal["none", "liger"] = Field("none", description="liger: Liger's Triton kernels for RMSNorm, "
                                              "SwiGLU and RoPE (GPU only; pip install liger-kernel); with compile, "
                                              "only Liger's fused loss (the compiler fuses the layers' ops itself).")
    compile: bool = Field(False, description="torch.compile each decoder layer (one compiled graph reused by all "
                          "layers); the first steps pay the compile time. Measured on GPU: benchmarks/RESULTS.md.")
    compile_memory_budget: Optional[float] = Field(
        None, gt=0, le=1, description="With compile: each layer that is not checkpointed keeps this fraction of "
        "the activations it would keep by default and recomputes the rest, the cheapest first (matmuls are "
        "kept); an alternative to checkpointing whole layers, with gradient_checkpointing=false. 0.2 on the "
        "Llama-3-8B shape: 2.08x the plain loop's speed at its memory (benchmarks/RESULTS.md).")
    fp8_base: bool = Field(False, description="Multiply by the frozen 4-bit base weights in FP8 (e4m3, scaled row "
                           "by row) on the FP8 tensor cores, in the forward pass and for the backward's input "
                           "gradient; LoRA, attention and the loss stay bf16. Needs quantization.bits=4 and, on "
                           "GPUs, compute capability 8.9+ (L4, L40S, H100, H200). With compile and "
                           "compile_memory_budget 0.15 on the Llama-3-8B shape: 2.55x the plain loop's speed below "
                           "its memory on an H100 (benchmarks/RESULTS.md).")
    fused_cross_entropy: bool = Field(False, description="Compute the loss from the last hidden states in chunks, "
                                      "never holding all [tokens x vocab] logits (Liger's fused kernel with "
                                      "kernels=liger on GPU, chunked torch otherwise). Saves GBs for large vocabularies.")
    group_by_length: bool = Field(False, description="Build micro-batches of examples of similar length (less "
                                  "padding); still a seeded, deterministic order, so resuming stays exact.")
    auto_batch_size: bool = Field(False, description="On GPU out of memory, retry with half of batch_size and "
                                  "twice gradient_accumulation (same global batch), down to batch_size 1.")
    seed: int = Field(42, description="Seed of the LoRA initialisation, the example order and dropout.")
    log_every: int = Field(5, gt=0, description="Report metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only before and after training).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("train.warmup_steps and train.warmup_ratio are both set: keep one")
        if self.checkpointed_fraction < 1 and not self.gradient_checkpointing:
            raise ValueError(f"train.checkpointed_fraction={self.checkpointed_fraction} has no effect without "
                             "train.gradient_checkpointing: set train.gradient_checkpointing=true, or remove it")
        if self.compile_memory_budget is not None and not self.compile:
            raise ValueError("train.compile_memory_budget applies to compiled layers and train.compile is false: "
                             "set train.compile=true, or remove compile_memory_budget")
        if self.compile_memory_budget is not None and self.gradient_checkpointing and self.checkpointed_fraction == 1:
            raise ValueError("train.compile_memory_budget has no effect while every layer is checkpointed (they "
                             "recompute everything): set train.gradient_checkpointing=false, or "
                             "train.checkpointed_fraction below 1")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} is not below train.max_steps={self.max_steps}, "
                             "so the learning rate never leaves warmup: lower warmup_steps, or use warmup_ratio")
        return self


class EvaluationSection(Section):
    generate: bool = Field(True, description="Generate answers for held-out prompts and score exact match.")
    max_new_tokens: int = Field(32, gt=0, description="Longest greedy answer generated per held-out prompt.")
    num_generate: int = Field(32, gt=0, description="Held-out examples to generate for.")
    batch_size: int = Field(16, gt=0,
            description="Held-out examples per forward pass (split further to bound the logits' memory).")
    answer_metric: Literal["exact", "final_number"] = Field(
        "exact", description="exact: exact_match only. final_number: also final_number_match, whether the last "
        "number of the answer (GSM8K: the one after '####') equals the reference's.")
    multiple_choice_path: Optional[str] = Field(
        None, description="Held-out multiple-choice file (question, choices, answer letter or index), scored "
        "MMLU-style before and after training by comparing the next-token logits of the answer letters "
        "(metric mc_accuracy).")


class ScalingSection(Section):
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks); with min_workers, the "
                             "most the run uses.")
    min_workers: Optional[int] = Field(
        None, gt=0, description="Elastic training: Ray Train starts on as many workers as fit between min_workers "
        "and num_workers, restarts on however many are left after a worker or node is lost, and grows back when "
        "capacity returns. The global batch (train.batch_size x train.gradient_accumulation x num_workers) stays "
        "the same: on fewer workers each accumulates more micro-batches per step. Unset: exactly num_workers.")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: every worker holds the whole 4-bit model and all-reduces LoRA gradients. fsdp: "
        "FSDP2 shards every decoder layer's parameters, the 4-bit weights included (their packed bytes typed as "
        "the compute dtype), so each worker holds about 1/num_workers of the model between its "
        "layers' forward and backward passes: for bases that do not fit one GPU. deepspeed: a DeepSpeed ZeRO "
        "engine (scaling.zero_stage) partitions the LoRA optimizer states (and gradients) over the workers; "
        "every worker holds the whole 4-bit model, as with ddp (needs the deepspeed package).")
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage for scaling.strategy=deepspeed: 1 partitions the optimizer states, "
        "2 the gradients too. 3 (partitioned parameters) is refused: on a bitsandbytes 4-bit base it changed "
        "the forward pass after the first micro-batch (measured); scaling.strategy=fsdp shards 4-bit weights.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    accelerator_type: Optional[str] = Field(
        None, min_length=1, description="Ray accelerator type the workers must run on, e.g. A10G, A100, H100, L4 "
        "(case-sensitive, as in ray.util.accelerators; passed to ray.train.ScalingConfig(accelerator_type=...), "
        "which places each worker on a node with resource accelerator_type:<type>). Unset: any node.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves (fractions allowed).")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources.")
    ray_address: Optional[str] = Field(None, description="Ray cluster address (host:port, or auto: the cluster "
                                       "`ray start` last started on this machine); unset: start a local cluster "
                                       "(or join the one `ray job submit` runs in, which sets RAY_ADDRESS).")
    storage_path: str = Field("runs", description="Where Ray Train keeps checkpoints: a cloud URI or shared "
                              "folder on multi-node clusters; a relative path is under $QLORA_HOME (default: the "
                              "current folder, or ~/qlora_runs inside a `ray job submit` job).")
    max_failures: int = Field(3, ge=-1, description="Restarts after a worker crashes (or is killed, or runs out of "
                              "host memory), each resuming from the latest checkpoint; -1: no limit. Preemptions "
                              "are counted apart (max_preemptions).")
    max_preemptions: int = Field(-1, ge=-1, description="Restarts after a preemption notice (SIGTERM to a worker, or "
                                 "Ray draining its node), each resuming from the checkpoint written on the notice; "
                                 "-1: no limit.")


class TrackingSection(Section):
    enabled: bool = Field(True, description="Log params, metrics, config and the adapter to MLflow.")
    uri: Optional[str] = Field(None, description="MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else a "
                               "sqlite store in the project folder (mlflow.db, artifacts in mlruns/).")
    experiment: str = Field("qlora", description="MLflow experiment; may hold {section.key} placeholders like "
                            "run_name.")
    run_name: Optional[str] = Field(None, description="Also the Ray Train run folder: rerunning with the same "
                                    "name resumes from its latest checkpoint in scaling.storage_path. May hold "
                                    "{section.key} placeholders filled from this config, e.g. "
                                    "qwen-r{lora.r}-lr{train.learning_rate}-n{data.max_samples}-ep{train.epochs}.")
    register_as: Optional[str] = Field(None, description="Register the final adapter in the MLflow Model "
                                       "Registry under this name (load it later as models:/NAME/VERSION).")

    @model_validator(mode="after")
    def _no_secret_in_uri(self):
        # The config is printed by --dry-run, saved with every checkpoint and logged as MLflow params.
        if self.uri and redact_uri(self.uri) != self.uri:
            raise ValueError(f"tracking.uri {redact_uri(self.uri)} carries a password or token, which would be "
                             "saved with the config and logged to MLflow: remove it from the URI and set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                             "in the environment")
        return self
