"""Base model in 4/8/16 bit + LoRA via peft, and the check that LoRA really adapts something.

bitsandbytes is only touched through transformers' BitsAndBytesConfig when bits < 16, so this module
imports on machines without it.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qlora import console, tasks, weights_cache
from qlora.config import JobConfig, LoraSection, QuantizationSection
from qlora.errors import ConfigError
from qlora.model_source import ModelSource, cache_root

LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
PAD_TOKEN = "[PAD]"  # what model.pad_token=add adds, as QLoRA does


def compute_dtype(quant: QuantizationSection, device: torch.device) -> torch.dtype:
    """The matmul dtype: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if quant.compute_dtype != "auto":
        return getattr(torch, quant.compute_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quant: QuantizationSection, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig
    if quant.bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                                  bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=dtype)
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_source(source: ModelSource, cfg: JobConfig) -> None:
    """Refuse what the config has not allowed, before any file of the model is parsed: pickle weights
    (unpickling can run code) and Python code shipped with the model. Every loader here calls it first."""
    if source.pickle_only:
        if not cfg.model.allow_pickle:
            raise ConfigError(f"model.name: {source.path} holds only pickle weights (*.bin / *.pt), and loading a "
                              "pickle file can run arbitrary code",
                              "convert the weights to safetensors (model.save_pretrained(folder) writes them), or "
                              "set model.allow_pickle=true if you trust where the files came from")
        if source.path not in _warned_pickle:
            _warned_pickle.add(source.path)
            print(f"[qlora] WARNING: model.allow_pickle=true: loading pickle weights from {source.path}", flush=True)
    if source.is_local and not cfg.model.trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        config = json.loads((Path(source.path) / "config.json").read_text())
        auto_map = config.get("auto_map") or {}
        if "AutoConfig" in auto_map and config.get("model_type") not in CONFIG_MAPPING:
            raise _remote_code_error(source.path, auto_map)


_warned_pickle: set[str] = set()


def _remote_code_error(where: str, auto_map) -> ConfigError:
    shown = f" (config.json auto_map: {', '.join(sorted(auto_map))})" if auto_map else ""
    return ConfigError(f"model.name: {where} needs Python code shipped with the model{shown}, and "
                       "model.trust_remote_code is false",
                       "read the model's .py files and set model.trust_remote_code=true only if you trust them, "
                       "or use a model type transformers supports natively")


def load_tokenizer(source: ModelSource, cfg: JobConfig):
    from transformers import AutoTokenizer
    check_source(source, cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source.path, revision=None if source.is_local else cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:  # transformers' assorted "cannot load" errors
        if "trust_remote_code" in str(e):
            raise _remote_code_error(source.path, None) from None
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        fix = ("copy the model's tokenizer files (tokenizer.json, or tokenizer_config.json with its vocabulary) "
               "into the folder" if source.is_local else
               "check model.name is a hub id you can reach (network, HF_TOKEN for gated models)")
        raise ConfigError(f"model.name: the tokenizer of {source.path} could not be loaded ({type(e).__name__}: "
                          f"{why})", fix) from None
    if source.is_local:
        check_vocab(tok, Path(source.path))
    if cfg.model.pad_token == "add" and (tok.pad_token is None or tok.pad_token == tok.eos_token):
        tok.add_special_tokens({"pad_token": PAD_TOKEN})  # load_base_model grows the embeddings to match
    elif tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is harmless here.
        tok.pad_token = tok.eos_token
    return tok


def grow_embeddings(model, n_tokens: int) -> int:
    """Give the model `n_tokens` embedding rows if it has fewer; the new input and output rows are the mean
    of the existing ones (QLoRA's smart_tokenizer_and_embedding_resize). Deterministic given the base
    weights, so training and every later load create identical rows. Returns how many rows were added."""
    old = model.get_input_embeddings().weight.shape[0]
    if n_tokens <= old:
        return 0
    model.resize_token_embeddings(n_tokens, mean_resizing=False)
    with torch.no_grad():
        weights = {m.weight.data_ptr(): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                   if m is not None}  # tied embeddings: one tensor, set once
        for w in weights.values():
            w[old:] = w[:old].float().mean(0, keepdim=True).to(w.dtype)
    return n_tokens - old


def check_vocab(tok, folder: Path) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    config = json.loads((folder / "config.json").read_text())
    vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    if isinstance(vocab, int) and len(tok) > vocab:
        raise ConfigError(f"model.name: the tokenizer in {folder} has {len(tok):,} tokens but the model embeds only "
                          f"{vocab:,} (config.json vocab_size): ids above {vocab - 1} would crash training",
                          "use the tokenizer files that belong to this model")


def fit_to_tokenizer(model, cfg: JobConfig, pad_token_id: int | None, n_tokens: int | None) -> None:
    """What the tokenizer decides about a loaded base, for training and merging alike: a classifier pools
    the last non-pad token (so it needs the pad id); an added [PAD] token needs its embedding rows."""
    tasks.for_config(cfg).fit_base(model, pad_token_id)
    if cfg.model.pad_token == "add":  # the rows of an added [PAD] token (see load_tokenizer)
        grow_embeddings(model, n_tokens)


def keep_cpu_weights_trainable(model) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its AVX512-BF16 CPU kernel. It repacks in
    place at the first no-grad eval-mode forward, and the repacked path has no autograd: training after an
    evaluation then gets wrong gradients through every 4-bit layer, silently (measured: layer-0 LoRA gradient
    norm 0.016 instead of 0.025 on a tiny Llama), and the weights no longer dequantize."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base_model(cfg: JobConfig, source: ModelSource, device: torch.device, pad_token_id: int | None = None,
                    prepare: Callable[[nn.Module, torch.dtype], None] | None = None, keep_quantized: bool = True,
                    report: Callable[[str], None] = lambda line: None):
    """The frozen base model on `device`, quantized as the config says, ready for k-bit training.
    A sequence classifier needs the tokenizer's `pad_token_id`: it pools the last token that is not padding.
    `prepare(model, compute dtype)`: the distributed strategy's hook (Strategy.prepare_base), called once the
    weights are quantized and before k-bit preparation. A 4-bit base comes from this machine's cache of quantized
    weights when it has it (qlora/weights_cache.py); else it is quantized here and, if `keep_quantized`, kept
    there. `report(line)`: where to say which, and how long it took."""
    check_source(source, cfg)
    cls, task_kwargs = tasks.for_config(cfg).auto_class(cfg)
    dtype = compute_dtype(cfg.quantization, device)
    qconf = quantization_config(cfg.quantization, dtype)
    if task_kwargs:
        console.expect_new_classifier_head()
    cache_key = weights_cache.key(cfg, source, dtype, device) if weights_cache.applies(cfg, source) else None
    cached = weights_cache.lookup(cache_key)
    started = time.perf_counter()
    # A cached folder's config.json carries the quantization it was written with (quantization_config=None
    # passed explicitly would load its packed bytes as plain weights).
    quantization = {} if cached or qconf is None else {"quantization_config": qconf}
    model = cls.from_pretrained(
        str(cached) if cached else source.path, **task_kwargs, **quantization,
        revision=None if cached or source.is_local else cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
        dtype=dtype, device_map={"": device},
        # Pickle weights only when the config allows them; otherwise transformers refuses *.bin files itself.
        use_safetensors=None if cfg.model.allow_pickle else True,
    )
    seconds = time.perf_counter() - started
    forget_4bit_deserialization(model)
    if cached:
        report(f"4-bit base loaded from the quantized-weights cache {cached} in {seconds:.1f} s")
    elif cache_key and keep_quantized:
        started = time.perf_counter()
        try:
            kept = weights_cache.store(model, cache_key, source.description, seconds)
        except OSError as e:  # a full or read-only disk costs the next job the quantization, never this job
            report(f"4-bit base quantized in {seconds:.1f} s; not kept ({e}): free space in {cache_root()} "
                         "or set quantization.cache_weights=false")
        else:
            report(f"4-bit base quantized in {seconds:.1f} s; kept in {kept} for the next job "
                         f"({time.perf_counter() - started:.1f} s)")
    elif qconf is not None:
        report(f"base loaded and quantized in {seconds:.1f} s")
    model.config.use_cache = False
    keep_cpu_weights_trainable(model)
    if prepare is not None and qconf is not None:
        prepare(model, dtype)
    fit_to_tokenizer(model, cfg, pad_token_id,
                     len(load_tokenizer(source, cfg)) if cfg.model.pad_token == "add" else None)
    if qconf is not None:
        from peft import prepare_model_for_kbit_training
        # Casts norms/embeddings to fp32 (stable training) and wires gradient checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


def forget_4bit_deserialization(model) -> None:
    """transformers (5.17) records the converter that rebuilt a pre-quantized checkpoint's 4-bit weights, and
    save_pretrained then tries to reverse it and fails (NotImplementedError), even for the dequantized, merged
    model an export writes. Dropped: 4-bit layers serialize themselves, as in a model quantized at load."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not any(
            type(op).__name__ == "Bnb4bitDeserialize" for op in getattr(c, "operations", []))]


def lora_config(lora: LoraSection, task: str = "causal_lm"):
    from peft import LoraConfig
    # SEQ_CLS makes peft train and save the (new, randomly initialised) classification head in full
    # (modules_to_save) beside the LoRA weights.
    # LoftQ starts from peft's default init: init_lora_weights (below) then fits A and B to each 4-bit layer.
    init = {"default": True, "loftq": True, "gaussian": "gaussian"}[lora.init]
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      target_modules=lora.target_modules, layers_to_transform=lora.layers_to_transform,
                      use_dora=lora.use_dora, use_rslora=lora.use_rslora, init_lora_weights=init,
                      task_type=tasks.TASKS[task].peft_task_type)


def init_lora_weights(model, lora: LoraSection, source: ModelSource) -> None:
    """lora.init=loftq: peft's LoftQ fit of every 4-bit layer's A and B to the error between the quantized
    weight and the base's full-precision weight (read from its safetensors), so training starts closer to the
    unquantized model. The other inits happen inside get_peft_model."""
    if lora.init != "loftq":
        return
    from peft.utils.loftq_utils import replace_lora_weights_loftq
    replace_lora_weights_loftq(model, model_path=source.path if source.is_local else None)
    # peft sets B A to the residual's low-rank fit itself, but the layer adds scaling * B A (alpha / r, or
    # alpha / sqrt(r) with rsLoRA): unless scaling is 1 the start overshoots the fit (measured on an H200 at
    # alpha / r = 2: exactly the quantization error of B = 0). Divide it out of B.
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Linear4bit" and hasattr(module, "lora_B"):
                for name, b in module.lora_B.items():
                    b.weight.div_(module.scaling[name])


def check_lora_init(lora: LoraSection, source: ModelSource) -> None:
    """Before any cluster: LoftQ reads the base's full-precision weights from model.safetensors (or its index)."""
    if lora.init != "loftq" or not source.is_local:
        return
    folder = Path(source.path)
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise ConfigError(f"lora.init=loftq reads the full-precision weights of {folder}, which has no "
                          "model.safetensors (or model.safetensors.index.json)",
                          "save the base with save_pretrained (safetensors), or use lora.init=default")


def layer_count(model: nn.Module) -> int:
    return 1 + max((int(m.group(1)) for name, _ in model.named_modules() if (m := LAYER_INDEX.search(name + "."))),
                   default=-1)


def resolve_layers(model: nn.Module, lora: LoraSection) -> LoraSection:
    """lora.skip_first_layers=N as layers_to_transform = N..last (it needs the model's layer count), and
    all-linear as the names of the layers' linear modules when layers are chosen (peft refuses
    layers_to_transform with the all-linear string)."""
    if lora.skip_first_layers:
        n = layer_count(model)
        if lora.skip_first_layers >= n:
            raise ConfigError(f"lora.skip_first_layers={lora.skip_first_layers} skips every layer: the model has {n}",
                              f"use a value below {n}, or 0 to adapt every layer")
        lora = lora.model_copy(update={"layers_to_transform": list(range(lora.skip_first_layers, n)),
                                       "skip_first_layers": 0})
    if lora.layers_to_transform is not None and lora.target_modules == "all-linear":
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and LAYER_INDEX.search(name)})
        lora = lora.model_copy(update={"target_modules": names})
    return lora


def attach_lora(model: nn.Module, lora: LoraSection, task: str = "causal_lm"):
    """Wrap in a peft LoRA model and verify the trainable count against an independent computation."""
    from peft import get_peft_model
    lora = resolve_layers(model, lora)
    expected = expected_lora_params(model, lora)
    if expected == 0 and lora.layers_to_transform is not None and expected_lora_params(
            model, lora.model_copy(update={"layers_to_transform": None})):
        layers = sorted({int(m.group(1)) for name, _ in model.named_modules() if (m := LAYER_INDEX.search(name + "."))})
        has = f"layers 0-{layers[-1]}" if layers else "no numbered layers"
        raise ConfigError(f"LoRA adapts nothing: lora.layers_to_transform={lora.layers_to_transform} names no layer "
                          f"of the model (it has {has})",
                          "use valid layer indices" + (f" (0 to {layers[-1]})" if layers else "")
                          + ", or unset lora.layers_to_transform")
    try:
        peft_model = get_peft_model(model, lora_config(lora, task))
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"lora.target_modules={lora.target_modules} matches no module of the model ({e})",
                          f"use all-linear or names from: {', '.join(linear_module_names(model))}") from None
    verify_lora_params(peft_model, expected, lora)
    return peft_model


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct suffixes of the linear layers LoRA may target (for error messages)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def expected_lora_params(model: nn.Module, lora: LoraSection) -> int:
    """r * (in + out) (+ out with DoRA) for every linear layer the config selects, computed without peft. The LM head and a
    classification head (`score` / `classifier`, trained whole by peft, not by LoRA) are never counted."""
    heads = [model.get_output_embeddings(), getattr(model, "score", None), getattr(model, "classifier", None)]
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(module is h for h in heads):
            continue
        if lora.target_modules != "all-linear" and not any(
                name == t or name.endswith("." + t) for t in lora.target_modules):
            continue
        if lora.layers_to_transform is not None:
            m = LAYER_INDEX.search(name)
            if m is None or int(m.group(1)) not in lora.layers_to_transform:
                continue
        # DoRA adds one trained magnitude per output feature of the layer.
        total += lora.r * (module.in_features + module.out_features) + (module.out_features if lora.use_dora else 0)
    return total


def lora_param_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


def verify_lora_params(peft_model: nn.Module, expected: int, lora: LoraSection) -> None:
    actual = lora_param_count(peft_model)
    if actual == 0 or expected == 0:
        raise ConfigError(f"LoRA adapts nothing: lora.target_modules={lora.target_modules}, "
                          f"lora.layers_to_transform={lora.layers_to_transform} select no linear layer",
                          "target existing modules (all-linear, or e.g. [q_proj, v_proj]) and valid layer indices")
    if actual != expected:
        raise ConfigError(f"LoRA trainable parameters: peft made {actual:,} but the config selects {expected:,}",
                          "check lora.target_modules / layers_to_transform against the model's module names")


def trainable_summary(model: nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def meta_lora_model(cfg: JobConfig, source: ModelSource):
    """The LoRA model on the meta device (no memory, no weights read): for --dry-run counts."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    check_source(source, cfg)
    try:
        config = AutoConfig.from_pretrained(source.path, revision=None if source.is_local else cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise _remote_code_error(source.path, None) from None
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"model.name: the model config of {source.path} could not be used ({type(e).__name__}: "
                          f"{why})", "point model.name at a causal LM whose config.json model_type the installed "
                          "transformers supports") from None
    cls, task_kwargs = tasks.for_config(cfg).auto_class(cfg)
    for key, value in task_kwargs.items():
        setattr(config, key, value)
    with init_empty_weights():
        model = cls.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return attach_lora(model, cfg.lora, cfg.model.task)


def decoder_layers(model) -> list:
    """The model's decoder layers: transformers' GradientCheckpointingLayer instances, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
