"""JobConfig: the whole typed config, with the checks across its sections (optimizer vs GPU, task vs data
format, what each distributed strategy refuses) and the run-name templates resolved once."""
from __future__ import annotations

import json
import math

from pydantic import Field, model_validator

from qlora.config.names import resolve_name_template
from qlora.config.sections import (CLASSIFICATION_FORMATS, GPU_ONLY_OPTIMIZERS, PREFERENCE_FORMATS, DataSection,
                                   EvaluationSection, LoraSection, ModelSection, PreferenceSection,
                                   QuantizationSection, ScalingSection, Section, TrackingSection, TrainSection)
from qlora.config.validation import set_path, validate


# The tasks that need a format of their own: (those formats, what the task needs, what such records hold, the fix
# of a mismatch).
TASK_FORMATS = {
    "sequence_classification": (CLASSIFICATION_FORMATS, "labelled records", "class labels",
                                "set data.format=classification (text + label columns) or data.format=pairwise "
                                "(prompt, response_a, response_b, winner_* columns)"),
    "preference": (PREFERENCE_FORMATS, "pairs", "answer pairs",
                   "set data.format=preference (prompt/chosen/rejected, chosen/rejected conversations, or the "
                   "Chatbot Arena columns)"),
}


class JobConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)

    def optimizer_to_use(self) -> str | None:
        """train.optimizer, or train.cpu_optimizer_fallback (None if unset) when the former needs a GPU this
        job lacks."""
        if self.train.optimizer in GPU_ONLY_OPTIMIZERS and not self.scaling.use_gpu:
            return self.train.cpu_optimizer_fallback
        return self.train.optimizer

    def micro_batches_per_step(self) -> int:
        """The global batch in micro-batches of train.batch_size: train.gradient_accumulation x
        scaling.num_workers, whatever the worker count a run has at the moment (qlora.batching)."""
        return self.train.gradient_accumulation * self.scaling.num_workers

    def accumulation_on(self, world_size: int) -> int:
        """Micro-batches each of `world_size` workers runs per optimizer step, keeping the global batch."""
        per_step = self.micro_batches_per_step()
        if per_step % world_size:
            raise ValueError(f"{world_size} workers cannot share the {per_step} micro-batches of a step evenly "
                             "(the config check refuses such worker ranges)")
        return per_step // world_size

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.optimizer_to_use() is None:  # a GPU-only optimizer on CPU, and no fallback named
            raise ValueError(f"train.optimizer={self.train.optimizer} is a bitsandbytes CUDA optimizer and "
                             "scaling.use_gpu is false: use train.optimizer=adamw, set scaling.use_gpu=true, or "
                             "set train.cpu_optimizer_fallback=adamw to switch on CPU only")
        if self.train.kernels == "liger" and not self.scaling.use_gpu:
            raise ValueError("train.kernels=liger runs Triton GPU kernels and scaling.use_gpu is false: use "
                             "train.kernels=none on CPU, or set scaling.use_gpu=true")
        if self.model.attn_implementation == "flex_attention" and not self.scaling.use_gpu:
            raise ValueError("model.attn_implementation=flex_attention trains on GPUs only (torch has no CPU "
                             "backward pass for FlexAttention): use sdpa on CPU, or set scaling.use_gpu=true")
        if self.quantization.bits != 16 and self.quantization.compute_dtype == "float16" and not self.scaling.use_gpu:
            raise ValueError("quantization.compute_dtype=float16 needs a GPU: use auto or float32 on CPU")
        if self.lora.init == "loftq" and self.quantization.bits != 4:
            raise ValueError(f"lora.init=loftq fits the adapter to the 4-bit quantization error, but "
                             f"quantization.bits={self.quantization.bits}: set quantization.bits=4, or lora.init=default")
        if self.train.fp8_base and self.quantization.bits != 4:
            raise ValueError(f"train.fp8_base multiplies by the 4-bit base weights in FP8, but quantization.bits="
                             f"{self.quantization.bits}: set quantization.bits=4, or train.fp8_base=false")
        if self.lora.init == "loftq" and not self.scaling.use_gpu:
            raise ValueError("lora.init=loftq: peft computes the LoftQ fit on a CUDA (or XPU) device only: set "
                             "scaling.use_gpu=true, or lora.init=default (or gaussian) on CPU")
        self._check_strategy()
        self._check_task()
        self._check_elastic()
        return self

    def _check_elastic(self) -> None:
        """Every worker count an elastic run may have must share a step's micro-batches evenly."""
        low, high = self.scaling.min_workers, self.scaling.num_workers
        if low is None:
            return
        if low > high:
            raise ValueError(f"scaling.min_workers={low} is above scaling.num_workers={high}: set min_workers <= "
                             "num_workers (num_workers is the most the run uses)")
        per_step = self.micro_batches_per_step()
        uneven = [w for w in range(low, high + 1) if per_step % w]
        if uneven:
            need = math.lcm(*(w // math.gcd(high, w) for w in range(low, high + 1)))
            fit = -(-self.train.gradient_accumulation // need) * need
            raise ValueError(
                f"scaling.min_workers={low}..num_workers={high}: a step's {per_step} micro-batches (the global batch "
                f"train.gradient_accumulation={self.train.gradient_accumulation} x num_workers={high}) cannot be "
                f"split evenly over {', '.join(map(str, uneven))} workers: set train.gradient_accumulation={fit}, "
                "or narrow the worker range")

    def _check_task(self) -> None:
        """What each task needs of the data format, and what it cannot do."""
        task, fmt = self.model.task, self.data.format
        if task in TASK_FORMATS and fmt not in TASK_FORMATS[task][0]:
            _, needs, _, fix = TASK_FORMATS[task]
            raise ValueError(f"model.task={task} needs {needs}, but data.format is {fmt}: {fix}")
        for other, (formats, _, holds, _) in TASK_FORMATS.items():
            if task != other and fmt in formats:
                raise ValueError(f"data.format={fmt} holds {holds}, which model.task={task} cannot learn: set "
                                 f"model.task={other}")
        for key in ("data.packing", "train.fused_cross_entropy"):
            section, field = key.split(".")
            if task != "causal_lm" and getattr(getattr(self, section), field):
                why = ("a sequence classifier has one label per example" if task == "sequence_classification" else
                       "preference losses compare whole answers, so each pair stays one unpacked row with its logits")
                raise ValueError(f"{key}=true is for next-token training; {why}: set {key}=false")
        if task != "sequence_classification" and self.model.num_labels is not None:
            raise ValueError(f"model.num_labels is set but model.task is {task}: set "
                             "model.task=sequence_classification, or remove num_labels")
        if task != "preference" and self.preference != PreferenceSection():
            raise ValueError(f"the preference section is set but model.task is {task}: set model.task=preference, "
                             "or remove the preference section")
        if task == "preference" and self.scaling.strategy == "deepspeed":
            raise ValueError("model.task=preference with scaling.strategy=deepspeed is not verified here (the "
                             "reference pass runs through the engine): use scaling.strategy=ddp or fsdp")

    def _check_strategy(self) -> None:
        """What the sharded strategies cannot do, refused before any worker starts."""
        if self.scaling.strategy in ("fsdp", "deepspeed") and (self.lora.use_dora or self.lora.init == "loftq"):
            what = "lora.use_dora=true" if self.lora.use_dora else "lora.init=loftq"
            raise ValueError(f"scaling.strategy={self.scaling.strategy} with {what} is not verified here (DoRA's "
                             "weight norms and LoftQ's fit read each whole 4-bit weight): use scaling.strategy=ddp, "
                             f"or unset {what.split('=')[0]}")
        if self.scaling.strategy == "deepspeed":
            return self._check_deepspeed()
        if self.scaling.strategy != "fsdp":
            return
        if self.quantization.bits == 8:
            raise ValueError("scaling.strategy=fsdp with quantization.bits=8: LLM.int8 weights keep their scales "
                             "inside the parameter, which FSDP cannot shard: use quantization.bits=4 (or 16), or "
                             "scaling.strategy=ddp")
        if self.optimizer_to_use() in GPU_ONLY_OPTIMIZERS:
            raise ValueError(f"scaling.strategy=fsdp with train.optimizer={self.optimizer_to_use()}: bitsandbytes "
                             "optimizers keep their state in their own (paged or 8-bit) buffers, not in the "
                             "sharded parameters, so it cannot be saved or restored per shard: use "
                             "train.optimizer=adamw (LoRA optimizer state is small), or scaling.strategy=ddp")
        if self.train.compile:
            raise ValueError("scaling.strategy=fsdp with train.compile=true: compiled layers are not verified "
                             "under FSDP2's per-layer hooks here: set train.compile=false, or scaling.strategy=ddp")

    def _check_deepspeed(self) -> None:
        if self.scaling.zero_stage == 3:
            raise ValueError("scaling.zero_stage=3 (partitioned parameters) is not supported: on a bitsandbytes 4-bit base "
                             "with LoRA it changed the forward pass after the first micro-batch (measured: loss "
                             "10.8069 instead of 10.8149 with unchanged weights): use scaling.strategy=fsdp to "
                             "shard the 4-bit weights, or scaling.zero_stage=2")
        # Verified on the DeepSpeed path: a 4-bit or 16-bit base, torch AdamW (DeepSpeed lists SGD and the
        # bitsandbytes optimizers as untested under ZeRO; their state is not reachable per partition either).
        if self.quantization.bits == 8:
            raise ValueError("scaling.strategy=deepspeed with quantization.bits=8 is not verified here: use "
                             "quantization.bits=4 (or 16), or scaling.strategy=ddp")
        if self.train.loraplus_lr_ratio is not None:
            raise ValueError("scaling.strategy=deepspeed with train.loraplus_lr_ratio: LoRA+ needs two optimizer "
                             "parameter groups, and ZeRO's state mapping here handles one: unset "
                             "train.loraplus_lr_ratio, or use scaling.strategy=ddp (or fsdp)")
        if self.optimizer_to_use() != "adamw":
            raise ValueError(f"scaling.strategy=deepspeed with train.optimizer={self.optimizer_to_use()}: ZeRO "
                             "partitions the state of torch AdamW only here (DeepSpeed marks SGD untested, and "
                             "bitsandbytes optimizers keep state it cannot partition or checkpoint): set "
                             "train.optimizer=adamw, or scaling.strategy=ddp")
        if self.train.compile:
            raise ValueError("scaling.strategy=deepspeed with train.compile=true is not verified here: set "
                             "train.compile=false, or scaling.strategy=ddp")

    @model_validator(mode="after")
    def _resolve_name_templates(self):
        # Resolved once, here, so the driver, resume lookup, sweeps and MLflow all see the same concrete name.
        for key in ("run_name", "experiment"):
            template = getattr(self.tracking, key)
            if template and ("{" in template or "}" in template):
                setattr(self.tracking, key, resolve_name_template(template, self, f"tracking.{key}"))
        return self

    def with_changes(self, changes: dict[str, object]) -> "JobConfig":
        """A copy with dotted keys changed ({"train.batch_size": 2}), validated again: the one way code changes
        a validated config, so every cross-field check still holds."""
        raw = self.model_dump()
        for key, value in changes.items():
            set_path(raw, key, value, "JobConfig.with_changes")
        return validate(JobConfig, raw)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "JobConfig":
        return validate(cls, json.loads(text))
