"""Base model in 4/8/16 bit + LoRA via peft, and the check that LoRA really adapts something.

bitsandbytes is only touched through transformers' BitsAndBytesConfig when bits < 16, so this module
imports on machines without it.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from qlora.config import JobConfig, LoraSection, QuantizationSection
from qlora.errors import ConfigError
from qlora.model_source import ModelSource

LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


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


def load_tokenizer(source: ModelSource, cfg: JobConfig):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(source.path, revision=None if source.is_local else cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is harmless here.
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: JobConfig, source: ModelSource, device: torch.device):
    """The frozen base model on `device`, quantized as the config says, ready for k-bit training."""
    from transformers import AutoModelForCausalLM
    dtype = compute_dtype(cfg.quantization, device)
    qconf = quantization_config(cfg.quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, revision=None if source.is_local else cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
        quantization_config=qconf, dtype=dtype, device_map={"": device}, use_safetensors=True,
    )
    model.config.use_cache = False
    if qconf is not None:
        from peft import prepare_model_for_kbit_training
        # Casts norms/embeddings to fp32 (stable training) and wires gradient checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


def lora_config(lora: LoraSection):
    from peft import LoraConfig
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      target_modules=lora.target_modules, layers_to_transform=lora.layers_to_transform,
                      task_type="CAUSAL_LM")


def attach_lora(model: nn.Module, lora: LoraSection):
    """Wrap in a peft LoRA model and verify the trainable count against an independent computation."""
    from peft import get_peft_model
    expected = expected_lora_params(model, lora)
    try:
        peft_model = get_peft_model(model, lora_config(lora))
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"lora.target_modules={lora.target_modules} matches no module of the model ({e})",
                          f"use all-linear or names from: {', '.join(linear_module_names(model))}") from None
    verify_lora_params(peft_model, expected, lora)
    return peft_model


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct suffixes of the linear layers LoRA may target (for error messages)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def expected_lora_params(model: nn.Module, lora: LoraSection) -> int:
    """r * (in + out) for every linear layer the config selects, computed without peft."""
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if lora.target_modules != "all-linear" and not any(
                name == t or name.endswith("." + t) for t in lora.target_modules):
            continue
        if lora.layers_to_transform is not None:
            m = LAYER_INDEX.search(name)
            if m is None or int(m.group(1)) not in lora.layers_to_transform:
                continue
        total += lora.r * (module.in_features + module.out_features)
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
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(source.path, revision=None if source.is_local else cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return attach_lora(model, cfg.lora)
