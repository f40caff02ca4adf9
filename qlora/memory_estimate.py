"""Per-worker GPU memory of a training step, estimated from parameter counts and the config (`--dry-run`).

Bytes one worker holds at its peak. T = train.batch_size x data.max_length tokens per micro-batch (the worst
case: every row full), h hidden size, I MLP size, L decoder layers, V the output head's rows (vocabulary).

  weights             decoder linear layers as bitsandbytes stores them: 4-bit 0.5 B/param + one absmax per
                      64-block (1 B with double quant plus an fp32 per 256 blocks, else 4 B); 8-bit 1 B/param + an
                      fp32 scale per output row. Every other base param (embeddings, untied head, norms) 4 B:
                      peft's prepare_model_for_kbit_training casts them to fp32. A 16-bit base: 2 B per param.
  lora_and_optimizer  per trainable param: fp32 weight 4 + fp32 gradient 4 + optimizer state (AdamW 8, 8-bit
                      AdamW 2, SGD's momentum 4) + 4 for DDP's gradient buckets when there are several workers.
                      DeepSpeed ZeRO (scaling.strategy=deepspeed): weight 4 + gradient 4 + its reduce bucket 4,
                      and divided by the workers its fp32 master copy 4 and optimizer state (ZeRO-1), and the
                      reduced gradients 4 (ZeRO-2); for LoRA this saves little: the states are small.
  activations         what the forward pass keeps for the backward: with gradient checkpointing, round(f x L)
                      layers keep only their input, T*h*a (a = 4: a 4/8-bit base's fp32 embedding keeps the residual
                      stream in fp32 under bf16 autocast; a = 2 for a 16-bit base), the others a full layer,
                      T*(c1*h + c2*I), or the part of it train.compile_memory_budget keeps; plus the final
                      norm's input T*h*a.
  logits              the loss: 12 B per logit (the fp32 log-softmax output, its gradient and the gradient of its
                      input are alive together in the loss's backward) for T rows, for one chunk of CHUNK_TOKENS
                      rows with the chunked torch loss, for none with Liger's fused kernel; preference pairs
                      (qlora/preference_loss.py's chunked log-probabilities) 4 B per logit for T rows, the bf16
                      logits it keeps and their gradient, plus its fp32 chunks; plus the bf16 copy of an fp32
                      head that autocast (or Liger's kernel) makes.
  workspace           the backward of one decoder layer: its recomputed activations when it is checkpointed, and
                      the gradients in flight, T*(16*h + 6*I); with DoRA also the temporaries peft's DoRA layer
                      makes in each forward (recomputed with the layer), for its largest adapted layer (i in,
                      o out): the identity it multiplies through lora_A (i*i), B A, the dequantized W and W + s B A
                      (3*o*i), 2 B each in bf16.
  total = weights + lora_and_optimizer + activations + max(logits, workspace): the loss and the layers' backward
  run one after the other, so their temporaries are never held together.

  gathered            FSDP only: weights a worker holds whole for a moment, beyond its shard: the decoder layer
                      it computes and the next (prefetched), and the output head (its own unit, gathered in the
                      loss).
DDP gives every worker the whole model, so the figure does not shrink with more workers; FSDP divides the
weights and the LoRA states (weights, gradients, optimizer) by the worker count and adds `gathered`.
Held-out evaluation runs without gradients and without autocast: fp32 logits, 12 B each (logits, the
reshaped copy token_losses makes, log-softmax), for as many rows of data.max_length tokens as
evaluation.rows_per_forward lets one forward take (at most evaluation.batch_size), beside the weights.
Checked against the peaks measured on an H100: benchmarks/RESULTS.md, "Memory estimate vs measured peak".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qlora.config import JobConfig
from qlora.evaluation import EVAL_BYTES_PER_LOGIT, EVAL_LOGIT_BYTES, rows_per_forward
from qlora.kernels import CHUNK_TOKENS
from qlora.mfu import dora_layers
from qlora.preference_loss import LOGIT_CHUNK

GIB = 2**30
BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
DOUBLE_QUANT_GROUP = 256  # double quant: the 8-bit absmax values get one fp32 scale per 256 of them

# Bytes a full decoder layer keeps per token: C_HIDDEN*h + C_MLP*I. Fitted to two measurements (H100, NF4,
# LoRA r=16 on all linear layers with dropout 0.05, Liger kernels, bf16 autocast, benchmarks/RESULTS.md):
# leaving one layer un-checkpointed cost 2.05 GiB at T=8192 on the Llama-3-8B shape (h 4096, I 14336) and
# 1.11 GiB on the Llama 1B shape (h 2048, I 8192). That cost is a full layer minus the input T*h*4 a
# checkpointed layer keeps, so a full layer is 285k and 154k bytes per token: 31*h + 11*I gives both.
# (By count: LoRA's dropout masks and bf16 copies of each adapted input, fp32 norms, the SwiGLU halves.)
C_HIDDEN = 31
C_MLP = 11
# Compiled layers (train.compile) keep as much as Liger's: 1.93 GiB per layer left un-checkpointed, measured
# on an H200 (8B shape, T=8192), as the constants above give. Under train.compile_memory_budget b < 1 a layer
# keeps KEPT_AT_ZERO_BUDGET + KEPT_PER_BUDGET * b of that (least squares over the five 8B rows at b = 0.2 to
# 0.6, same H200: benchmarks/memory_estimate_check.py; the compiler's knapsack moves in steps, so single rows
# are off by up to 8%); the compiler's own choice (b = 1) keeps it all.
KEPT_AT_ZERO_BUDGET = 0.11
KEPT_PER_BUDGET = 0.68
# Without Liger, transformers' RMSNorm also keeps its normalized fp32 input (4*h, two norms per layer) and
# SiLU(gate)*up keeps the SiLU output (2*I): counted from the ops, not measured.
C_HIDDEN_NO_LIGER = 8
C_MLP_NO_LIGER = 2
# Gradients in flight during one layer's backward: the fp32 residual gradient and the fp32 gradients of the
# adapted inputs (about four h-wide fp32 tensors), and the bf16 gradients around the MLP's down projection
# (about three I-wide). Counted, not fitted.
W_HIDDEN = 16
W_MLP = 6
DORA_BYTES_PER_ELEMENT = 2  # DoRA's temporaries are in the layer's input dtype: bf16 under autocast (peft's dora.py)
LOGIT_BYTES = 12  # fp32 log-softmax output + its gradient + the gradient of its input
PAIR_LOGIT_BYTES = 4  # preference log-probabilities: the bf16 logits kept for the backward + their gradient
PAIR_CHUNK_BYTES = 3 * 4 * LOGIT_CHUNK  # its fp32 temporaries for one chunk: upcast, softmax, gradient
OPTIMIZER_STATE_BYTES = {"adamw": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2,
                         "sgd": 4}  # two fp32 moments; two 8-bit moments; SGD's momentum (qlora.worker)

Loss = Literal["full", "chunked", "liger", "pair_logps"]


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (see `shape_of`)."""
    quantized_params: int  # weights of the decoder layers' linear modules: what bitsandbytes quantizes
    quantized_rows: int  # their output features, summed (8-bit keeps one fp32 scale per row)
    other_params: int  # the rest of the frozen base: embeddings, an untied head, norms, biases
    trainable_params: int  # LoRA, and a classifier head peft trains whole
    hidden_size: int
    intermediate_size: int
    num_layers: int
    head_rows: int  # outputs of the head: the vocabulary, or a classifier's labels
    dora_elements: int = 0  # DoRA: elements of the largest adapted layer's forward temporaries, i*i + 3*o*i


@dataclass(frozen=True)
class Setup:
    """The config values that move the estimate (`from_config` reads them from a JobConfig)."""
    bits: int
    double_quant: bool
    optimizer: str
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    checkpointed_fraction: float
    loss: Loss
    fused_layers: bool  # Liger's kernels in the decoder layers, or compiled layers (they keep alike: measured)
    workers: int
    eval_batch_size: int
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: int = 2  # with strategy=deepspeed
    compile_memory_budget: float | None = None

    @property
    def shards(self) -> int:
        """Workers the weights and LoRA states are divided over."""
        return self.workers if self.strategy == "fsdp" else 1

    @classmethod
    def from_config(cls, cfg: JobConfig) -> Setup:
        t = cfg.train
        # The worker's loss paths (qlora.kernels.forward_loss): the model's logits unless
        # fused_cross_entropy; then Liger's kernel with kernels=liger (a GPU-only setting), else chunked torch.
        loss: Loss = ("liger" if t.kernels == "liger" else "chunked") if t.fused_cross_entropy else "full"
        if cfg.model.task == "preference":  # the config refuses fused_cross_entropy for it
            loss = "pair_logps"
        # A preference pair is two rows (chosen, rejected) of one micro-batch. DPO's reference pass runs
        # without gradients before the policy's forward pass (qlora/preference.py): nothing of it is live at the
        # peak, so it adds no term.
        rows = 2 if cfg.model.task == "preference" else 1
        return cls(bits=cfg.quantization.bits, double_quant=cfg.quantization.double_quant, optimizer=cfg.optimizer_to_use(),
                   batch_size=t.batch_size * rows, max_length=cfg.data.max_length,
                   gradient_checkpointing=t.gradient_checkpointing, checkpointed_fraction=t.checkpointed_fraction,
                   loss=loss, fused_layers=t.kernels == "liger" or t.compile, workers=cfg.scaling.num_workers,
                   eval_batch_size=cfg.evaluation.batch_size * rows, strategy=cfg.scaling.strategy,
                   zero_stage=cfg.scaling.zero_stage, compile_memory_budget=t.compile_memory_budget)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


@dataclass(frozen=True)
class Estimate:
    """Bytes per term of one worker's peak (see the module docstring for what each counts)."""
    weights: int
    lora_and_optimizer: int
    activations: int
    logits: int
    workspace: int
    evaluation: int  # peak of the held-out evaluation pass: weights, LoRA and optimizer, fp32 logits
    gathered: int = 0  # FSDP: weights held whole beyond this worker's shard

    @property
    def total(self) -> int:
        return (self.weights + self.gathered + self.lora_and_optimizer + self.activations
                + max(self.logits, self.workspace))

    def lines(self, setup: Setup, on_gpu: bool = True) -> list[str]:
        """What --dry-run prints; `setup` is the one the estimate was made for."""
        def gib(n: int) -> str:
            return f"{n / GIB:.2f}"
        if setup.shards > 1:
            how = f"FSDP over {setup.workers} workers: each holds 1/{setup.workers} of the weights and LoRA states"
        elif setup.strategy == "deepspeed" and setup.workers > 1:
            how = (f"DeepSpeed ZeRO-{setup.zero_stage} over {setup.workers} workers: each holds the whole model "
                   f"and 1/{setup.workers} of the LoRA optimizer state")
        else:
            how = f"DDP over {setup.workers} worker(s): each holds the whole model"
        gathered = f" + layers gathered whole {gib(self.gathered)}" if setup.shards > 1 else ""
        out = [f"GPU memory per worker, estimated: {gib(self.total)} GiB for a training step of {setup.batch_size} x "
               f"{setup.max_length} tokens ({how})",
               f"  = weights {gib(self.weights)}{gathered} + LoRA, gradients and optimizer "
               f"{gib(self.lora_and_optimizer)} + "
               f"activations {gib(self.activations)} + the larger of the loss {gib(self.logits)} and one layer's "
               f"backward {gib(self.workspace)} (GiB)",
               f"  held-out evaluation (no gradients; fp32 logits of up to {setup.eval_batch_size} x "
               f"{setup.max_length} tokens, split to stay within {EVAL_LOGIT_BYTES / GIB:.0f} GiB of logits per "
               f"forward): {gib(self.evaluation)} GiB"]
        if not on_gpu:
            out.append("  this config trains on CPU (scaling.use_gpu=false): the same accounting, as a GPU estimate")
        return out

    def describe(self, setup: Setup, on_gpu: bool = True) -> str:
        return "\n".join(self.lines(setup, on_gpu))


def quantized_bytes(shape: ModelShape, bits: int, double_quant: bool) -> int:
    """The decoder's linear layers as stored: 16-bit, LLM.int8 with row scales, or 4-bit with block scales."""
    if bits == 16:
        return 2 * shape.quantized_params
    if bits == 8:
        return shape.quantized_params + 4 * shape.quantized_rows
    blocks = -(-shape.quantized_params // BLOCK)
    absmax = blocks + 4 * -(-blocks // DOUBLE_QUANT_GROUP) if double_quant else 4 * blocks
    return shape.quantized_params // 2 + absmax


def other_bytes_per_param(bits: int) -> int:
    return 2 if bits == 16 else 4  # on a 4/8-bit base prepare_model_for_kbit_training casts them to fp32


def weight_bytes(shape: ModelShape, bits: int, double_quant: bool) -> int:
    return quantized_bytes(shape, bits, double_quant) + other_bytes_per_param(bits) * shape.other_params


def trainable_bytes_per_param(optimizer: str, workers: int, strategy: str = "ddp", zero_stage: int = 2) -> float:
    state = OPTIMIZER_STATE_BYTES[optimizer]
    if strategy == "deepspeed" and workers > 1:
        partitioned = 4 + state + (4 if zero_stage == 2 else 0)  # master copy, state, (ZeRO-2) reduced gradients
        return 4 + 4 + 4 + (0 if zero_stage == 2 else 4) + partitioned / workers
    # DDP copies gradients into flat buckets for the all-reduce; FSDP reduce-scatters layer by layer.
    ddp_buckets = 4 if workers > 1 and strategy == "ddp" else 0
    return 4 + 4 + state + ddp_buckets


def gathered_bytes(shape: ModelShape, setup: Setup) -> int:
    """FSDP: two decoder layers whole (the one computing, the next prefetched) and the output head."""
    if setup.shards == 1:
        return 0
    per_layer = (quantized_bytes(shape, setup.bits, setup.double_quant) + 4 * shape.trainable_params) // shape.num_layers
    return 2 * per_layer + other_bytes_per_param(setup.bits) * shape.head_rows * shape.hidden_size


def layer_bytes(shape: ModelShape, tokens: int, fused: bool) -> int:
    """Activations a decoder layer keeps for its backward when it is not checkpointed."""
    c_hidden = C_HIDDEN + (0 if fused else C_HIDDEN_NO_LIGER)
    c_mlp = C_MLP + (0 if fused else C_MLP_NO_LIGER)
    return tokens * (c_hidden * shape.hidden_size + c_mlp * shape.intermediate_size)


def kept_fraction(compile_memory_budget: float | None) -> float:
    """Of a full layer's activations, what a layer that is not checkpointed keeps."""
    if compile_memory_budget is None or compile_memory_budget == 1:
        return 1.0
    return min(1.0, KEPT_AT_ZERO_BUDGET + KEPT_PER_BUDGET * compile_memory_budget)


def checkpointed_layers(shape: ModelShape, setup: Setup) -> int:
    # As kernels.select_checkpointed_layers chooses them.
    return round(setup.checkpointed_fraction * shape.num_layers) if setup.gradient_checkpointing else 0


def activation_bytes(shape: ModelShape, setup: Setup) -> int:
    residual = setup.tokens * shape.hidden_size * (2 if setup.bits == 16 else 4)
    kept = checkpointed_layers(shape, setup)
    full = shape.num_layers - kept
    layer = layer_bytes(shape, setup.tokens, setup.fused_layers)
    return (kept + 1) * residual + full * int(kept_fraction(setup.compile_memory_budget) * layer)


def logit_bytes(shape: ModelShape, setup: Setup) -> int:
    # The head is fp32 on a 4/8-bit base; autocast (Liger: the worker) multiplies with a bf16 copy of it.
    head_copy = 0 if setup.bits == 16 else 2 * shape.head_rows * shape.hidden_size
    if setup.loss == "pair_logps":
        return PAIR_LOGIT_BYTES * setup.tokens * shape.head_rows + PAIR_CHUNK_BYTES + head_copy
    rows = {"full": setup.tokens, "chunked": min(setup.tokens, CHUNK_TOKENS), "liger": 0}[setup.loss]
    return LOGIT_BYTES * rows * shape.head_rows + head_copy


def workspace_bytes(shape: ModelShape, setup: Setup) -> int:
    recomputed = layer_bytes(shape, setup.tokens, setup.fused_layers) if checkpointed_layers(shape, setup) else 0
    dora = DORA_BYTES_PER_ELEMENT * shape.dora_elements
    return recomputed + setup.tokens * (W_HIDDEN * shape.hidden_size + W_MLP * shape.intermediate_size) + dora


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """One worker's peak under setup.strategy (see the module docstring)."""
    weights = weight_bytes(shape, setup.bits, setup.double_quant) // setup.shards
    lora = int(shape.trainable_params * trainable_bytes_per_param(setup.optimizer, setup.workers, setup.strategy,
                                                                  setup.zero_stage) // setup.shards)
    eval_rows = rows_per_forward(setup.eval_batch_size, setup.max_length, shape.head_rows)  # as eval_loss splits
    eval_logits = EVAL_BYTES_PER_LOGIT * eval_rows * setup.max_length * shape.head_rows
    return Estimate(weights=weights, lora_and_optimizer=lora, activations=activation_bytes(shape, setup),
                    logits=logit_bytes(shape, setup), workspace=workspace_bytes(shape, setup),
                    evaluation=weights + lora + eval_logits, gathered=gathered_bytes(shape, setup))


def shape_of(model) -> ModelShape:
    """Counts from a LoRA model, typically the one on the meta device (modeling.meta_lora_model)."""
    from torch import nn

    from qlora.modeling import LAYER_INDEX, layer_count
    # bitsandbytes quantizes the linear layers of the decoder, not the output head (transformers keeps it).
    quantized = [m for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and LAYER_INDEX.search(name) and "lora_" not in name]
    text = model.config.get_text_config()
    head = model.get_output_embeddings()
    # On the meta device transformers leaves a tied head untied (its own tensor); loaded, it is the embedding.
    untied_copy = (head is not None and getattr(text, "tie_word_embeddings", False)
                   and head.weight is not model.get_input_embeddings().weight)
    not_other = {id(m.weight) for m in quantized} | ({id(head.weight)} if untied_copy else set())
    params = list(model.parameters())  # shared parameters once
    dora, _ = dora_layers(model)
    return ModelShape(quantized_params=sum(m.weight.numel() for m in quantized),
                      quantized_rows=sum(m.out_features for m in quantized),
                      other_params=sum(p.numel() for p in params if not p.requires_grad and id(p) not in not_other),
                      trainable_params=sum(p.numel() for p in params if p.requires_grad),
                      hidden_size=text.hidden_size,
                      intermediate_size=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
                      num_layers=layer_count(model),
                      head_rows=head.out_features if head is not None else model.config.num_labels,
                      dora_elements=max((i * i + 3 * o * i for i, o in dora), default=0))
