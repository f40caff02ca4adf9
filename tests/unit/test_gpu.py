"""GPU paths that CPU runs cannot reach, on small random models. On the GPU host (no pytest-xdist there, so the
project's addopts are replaced): `python -m pytest -m gpu tests/unit/test_gpu.py -o addopts=""`.

Each compares the optimized or distributed CUDA path with the plain one on the same weights and batches:
- Liger's kernels and the fused loss against transformers' own layers and loss (bf16 autocast, NF4 base);
- compiled layers, with and without a compile memory budget, against the plain layers;
- the fsdp wrapper and the DeepSpeed ZeRO-2 engine, each on a one-rank NCCL group, against the plain step;
- the DeepSpeed engine's forward under the step's bf16 autocast (DeepSpeed turns an outer CUDA autocast off
  unless its own config enables it: the 8B step once ran in fp32 at 0.57x DDP's speed);
- DPO's reference pass (bitsandbytes' CUDA 4-bit layers with the adapter off) against the 4-bit base loaded
  alone, and DPO through compiled layers (the reference pass runs them eagerly) against the plain layers.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from qlora import distributed, kernels, modeling, preference  # noqa: E402
from qlora.strategies import STRATEGIES, DeepSpeed, Strategy  # noqa: E402
from qlora.config import JobConfig  # noqa: E402
from qlora.model_source import ModelSource  # noqa: E402
from qlora.train_step import make_optimizer  # noqa: E402

CUDA = torch.device("cuda", 0)
VOCAB = 512


@pytest.fixture(scope="module")
def one_rank_group():
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + os.getpid() % 200))
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
                     ).save_pretrained(path)
    return path


def config(path, strategy: str = "ddp", **train) -> JobConfig:
    """The strategy is part of the config: under fsdp the loader stores the 4-bit weights as floats."""
    return JobConfig.model_validate({"model": {"name": str(path)}, "data": {"path": "unused.jsonl"},
                                     "lora": {"dropout": 0.0}, "train": {"learning_rate": 5e-3, **train},
                                     "scaling": {"use_gpu": True, "strategy": strategy}})


def lora_model(cfg: JobConfig):
    base = modeling.load_base_model(cfg, ModelSource(cfg.model.name, True, "random"), CUDA,
                                    prepare=STRATEGIES[cfg.scaling.strategy].prepare_base)
    kernels.apply_layer_kernels(base, cfg.train)
    torch.manual_seed(0)
    model = modeling.attach_lora(base, cfg.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the A matrices gradients too
            p.data.normal_(0, 0.02)
    return model


def batches(n: int) -> list[torch.Tensor]:
    """One random batch n times: the adapter memorizes it, so the loss falls far below ln(VOCAB) and a
    path that computed a different loss or gradient would fall differently."""
    ids = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(1)).to(CUDA)
    return [ids] * n


def train_losses(cfg: JobConfig, steps: int = 8) -> list[float]:
    """The worker's step (autocast, backward, clip, update) on a one-rank group, the config's strategy and
    speed levers (as the worker: compiled layers get only Liger's loss, not its layer kernels)."""
    model = lora_model(cfg)
    if cfg.train.compile:
        kernels.compile_layers(model, cfg.train.compile_memory_budget)
    hidden = kernels.HiddenStates(model, cfg.train.kernels == "liger") if cfg.train.fused_cross_entropy else None
    # One rank: ddp trains as one process (strategies.for_worker); fsdp and deepspeed on a one-rank group all the same.
    cls = Strategy if cfg.scaling.strategy == "ddp" else STRATEGIES[cfg.scaling.strategy]
    strategy = cls(distributed.Context(0, 1, CUDA, sharded=cls.lockstep), cfg)
    dtype = modeling.compute_dtype(cfg.quantization, CUDA)
    wrapped, optimizer = strategy.wrap(model, lambda params: make_optimizer(cfg, params),
                                       kernels.autocast_dtype(CUDA, dtype))
    losses = []
    for ids in batches(steps):
        with kernels.autocast(CUDA, dtype):
            loss_sum, n = kernels.forward_loss(wrapped, {"input_ids": ids}, ids, hidden)
        strategy.backward(wrapped, loss_sum / n, 1)
        strategy.apply_update(wrapped, optimizer, 1.0)
        losses.append((loss_sum / n).item())
    return losses


def test_liger_and_fused_loss_train_as_the_plain_layers_do(llama_dir):
    plain = train_losses(config(llama_dir))
    fused = train_losses(config(llama_dir, fused_cross_entropy=True))
    liger = train_losses(config(llama_dir, fused_cross_entropy=True, kernels="liger"))
    assert plain[-1] < 0.8 * plain[0]  # it memorizes the batch
    for other in (fused, liger):  # bf16 rounding differs between the paths; the training does not
        assert other == pytest.approx(plain, rel=2e-2)


@pytest.mark.parametrize("budget", [None, 0.2])
def test_compiled_layers_train_as_the_plain_layers_do(llama_dir, budget):
    """train.compile (Liger's loss, Inductor's fused layers), with and without compile_memory_budget (the
    compiler recomputes part of each layer, chosen by FLOPs, the 4-bit matmuls counted)."""
    plain = train_losses(config(llama_dir))
    try:
        compiled = train_losses(config(llama_dir, fused_cross_entropy=True, kernels="liger", compile=True,
                                       compile_memory_budget=budget))
    finally:
        kernels.set_activation_memory_budget(1.0)
        torch._dynamo.reset()
    assert plain[-1] < 0.8 * plain[0] and compiled == pytest.approx(plain, rel=2e-2)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_train_as_the_plain_step_does(llama_dir, one_rank_group, strategy):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")  # an optional extra: carried to a GPU host only with its wheel
    plain, other = train_losses(config(llama_dir)), train_losses(config(llama_dir, strategy))
    assert other[0] == pytest.approx(plain[0], abs=1e-4)  # same weights, same batch: the first loss is equal
    assert plain[-1] < 0.8 * plain[0] and other == pytest.approx(plain, rel=2e-2)


def test_deepspeed_engine_computes_under_the_steps_bf16_autocast(llama_dir, one_rank_group):
    pytest.importorskip("deepspeed")
    seen = {}
    for dtype in (None, torch.bfloat16):
        cfg = config(llama_dir)
        model = lora_model(cfg)
        model.base_model.model.model.layers[0].self_attn.o_proj.register_forward_hook(
            lambda m, i, out, key=dtype: seen.__setitem__(key, out.dtype))
        strategy = DeepSpeed(distributed.Context(0, 1, CUDA), cfg)
        engine, _ = strategy.wrap(model, lambda params: make_optimizer(cfg, params), autocast_dtype=dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            engine(input_ids=batches(1)[0])
    # Without the dtype passed on, the engine switched the step's autocast off: fp32 matmuls.
    assert seen == {None: torch.float32, torch.bfloat16: torch.bfloat16}


def packed_losses(cfg: JobConfig, steps: int = 8) -> list[float]:
    """The worker's step on one batch of packed rows (several examples per row, position_ids restarting,
    padded to the row width), as the train job feeds packed data."""
    from qlora.data import pack_examples
    from qlora.evaluation import to_tensors
    from qlora.batching import model_inputs, train_batch
    g = torch.Generator().manual_seed(2)
    examples = []
    for n in torch.randint(8, 60, (12,), generator=g).tolist():
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    batch = to_tensors(train_batch(pack_examples(examples, 128)[:3], 0, True, 128), CUDA)
    model = lora_model(cfg)
    if cfg.train.compile:
        kernels.compile_layers(model, cfg.train.compile_memory_budget)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    dtype = modeling.compute_dtype(cfg.quantization, CUDA)
    ctx = distributed.Context(0, 1, CUDA)
    step_runner = Strategy(ctx, cfg)
    from torch._dynamo.utils import counters
    from qlora.evaluation import eval_loss
    losses, graphs = [], None
    for step in range(steps):
        model.train()  # as the worker: evaluation leaves the model in eval mode
        with kernels.autocast(CUDA, dtype):
            loss_sum, n = kernels.forward_loss(model, model_inputs(batch), batch["labels"])
        step_runner.backward(model, loss_sum / n, 1)
        step_runner.apply_update(model, optimizer, 1.0)
        losses.append((loss_sum / n).item())
        if step == 2:  # held-out evaluation and generation between steps, as the worker runs them
            graphs = counters["stats"]["unique_graphs"]
            with kernels.for_evaluation(model, cfg.train.compile, cfg.model.attn_implementation):
                eval_loss(model, examples[:4], 0, 2, ctx)
                model.generate(input_ids=batch["input_ids"][:1, :20], max_new_tokens=4, do_sample=False)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again after the first steps
    return losses


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_trains_packed_rows_as_sdpa_does(llama_dir, compiled):
    """model.attn_implementation=flex_attention on packed rows: the block mask transformers builds from the
    restarting positions keeps the examples apart as sdpa's dense mask does (and skips the masked blocks)."""
    def run(attn):
        cfg = config(llama_dir, compile=compiled)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attn_implementation": attn})})
        try:
            return packed_losses(cfg)
        finally:
            torch._dynamo.reset()
    sdpa, flex = run("sdpa"), run("flex_attention")
    assert flex[0] == pytest.approx(sdpa[0], rel=1e-2)
    assert sdpa[-1] < 0.8 * sdpa[0] and flex == pytest.approx(sdpa, rel=2e-2)


def test_loftq_starts_the_4bit_model_closer_to_the_full_precision_weights(llama_dir):
    """lora.init=loftq (peft fits it on CUDA only): per adapted layer, || W - (dequant(W_4bit) + s B A) || is what
    LoftQ minimises; the default init (B = 0) leaves the whole quantization error. Against the base's safetensors."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file
    full = load_file(str(llama_dir / "model.safetensors"))
    errors = {}
    for init in ("default", "loftq"):
        cfg = JobConfig.model_validate({"model": {"name": str(llama_dir)}, "data": {"path": "unused.jsonl"},
                                        "lora": {"dropout": 0.0, "init": init, "r": 64, "alpha": 16},
                                        "scaling": {"use_gpu": True}})  # scaling 1/4: init_lora_weights divides it out
        source = ModelSource(str(llama_dir), True, "random")
        torch.manual_seed(0)
        model = modeling.attach_lora(modeling.load_base_model(cfg, source, CUDA), cfg.lora)
        modeling.init_lora_weights(model, cfg.lora, source)
        total = 0.0
        for name, m in model.named_modules():
            if type(m).__name__ != "Linear4bit" or not hasattr(m, "lora_A"):
                continue
            w = full[name.removeprefix("base_model.model.") + ".weight"].float().to(CUDA)
            quantized = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            delta = (m.lora_B["default"].weight @ m.lora_A["default"].weight).float() * m.scaling["default"]
            total += (w - quantized - delta).norm().item() ** 2
        errors[init] = total ** 0.5
    assert errors["loftq"] < 0.9 * errors["default"], errors


def preference_config(path, **train) -> JobConfig:
    return JobConfig.model_validate({"model": {"name": str(path), "task": "preference"},
                                     "data": {"path": "unused.jsonl", "format": "preference"},
                                     "lora": {"dropout": 0.0}, "train": {"learning_rate": 5e-3, **train},
                                     "preference": {"loss": "dpo", "beta": 0.1}, "scaling": {"use_gpu": True}})


def pair_batch() -> tuple[dict, torch.Tensor]:
    """Two pairs of random ids as the collator lays them out (rows i and 2 + i are one pair): a shared 48-token
    prompt, masked, and 32-token answers."""
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, VOCAB, (2, 48), generator=g)
    chosen, rejected = (torch.randint(0, VOCAB, (2, 32), generator=g) for _ in range(2))
    ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)]).to(CUDA)
    labels = ids.clone()
    labels[:, :48] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def test_the_dpo_reference_is_the_4bit_base_without_the_adapter(llama_dir):
    """bitsandbytes' CUDA Linear4bit under bf16 autocast, peft's adapters toggled off: the reference's summed
    log-probabilities equal those of the same 4-bit base loaded alone, without LoRA layers. (Not those of the
    adapted model with B zeroed: under autocast peft's enabled path rounds the base layer's input to bf16, so
    on CUDA that differs from the base by bf16 rounding, 0.5 at one q_proj output, 0.7% in a summed logp.)"""
    cfg = preference_config(llama_dir)
    base = modeling.load_base_model(cfg, ModelSource(cfg.model.name, True, "random"), CUDA)
    model, (inputs, labels) = lora_model(cfg), pair_batch()
    dtype = modeling.compute_dtype(cfg.quantization, CUDA)
    with kernels.autocast(CUDA, dtype):
        with preference.reference_policy(model):
            reference = preference.pair_logps(model, inputs, labels)[0]
        with torch.no_grad():
            alone = preference.pair_logps(base, inputs, labels)[0]
            policy = preference.pair_logps(model, inputs, labels)[0]
    torch.testing.assert_close(reference, alone, rtol=0, atol=1e-3)
    assert (policy - reference).abs().max() > 0.1  # the adapter was on again for the policy


def dpo_losses(cfg: JobConfig, steps: int = 8) -> list[float]:
    """The DPO objective's step on one batch of pairs: reference pass, policy pass, backward, AdamW."""
    model = lora_model(cfg)
    if cfg.train.compile:
        kernels.compile_layers(model, cfg.train.compile_memory_budget)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    dtype, (inputs, labels) = modeling.compute_dtype(cfg.quantization, CUDA), pair_batch()
    losses = []
    for _ in range(steps):
        with kernels.autocast(CUDA, dtype):
            total, pairs = preference.forward_loss(model, inputs, labels, cfg.preference)
        (total / pairs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((total / pairs).item())
    return losses


def test_dpo_through_compiled_layers_trains_as_the_plain_layers_do(llama_dir):
    plain = dpo_losses(preference_config(llama_dir))
    try:
        compiled = dpo_losses(preference_config(llama_dir, compile=True))
    finally:
        torch._dynamo.reset()
    assert plain[-1] < 0.5 * plain[0]  # ln 2 at the start (policy = reference up to the random B), then far below
    assert compiled == pytest.approx(plain, rel=5e-2, abs=1e-3)
