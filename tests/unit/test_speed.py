"""Speed levers (qlora/kernels.py) give the same loss and gradients as the plain path; MFU arithmetic.

The GPU-only pieces (Liger's Triton kernels) are measured on the GPU host: benchmarks/speed.py."""
import pytest
import torch
import torch.nn.functional as F

from qlora import kernels, mfu
from qlora.config import LoraSection, load_config
from qlora.data import IGNORE
from qlora.errors import ConfigError
from qlora.modeling import attach_lora

from conftest import ROOT


def tiny_lora_model(layers=4, seed=0, gc=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(1)
    return attach_lora(model, LoraSection(r=4, alpha=8, dropout=0.0))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :10] = IGNORE  # a masked prompt
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a padded row
    labels[2, 30:] = IGNORE
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def loss_and_grads(model, hidden=None):
    model.zero_grad()
    b = batch()
    loss_sum, n = kernels.forward_loss(model, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
                                         b["labels"], hidden)
    (loss_sum / n).backward()
    return loss_sum.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_chunked_cross_entropy_equals_plain_in_value_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(100, 16, requires_grad=True)
    labels = torch.randint(0, 100, (37,))
    labels[::5] = IGNORE
    plain = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE, reduction="sum")
    g_plain = torch.autograd.grad(plain, [hidden, weight])
    chunked = kernels.chunked_linear_cross_entropy(hidden, weight, labels, chunk=8)
    g_chunked = torch.autograd.grad(chunked, [hidden, weight])
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b)


def test_fused_loss_through_the_head_hook_matches_the_model_logits():
    plain_loss, plain_grads = loss_and_grads(tiny_lora_model())
    model = tiny_lora_model()
    hidden = kernels.HiddenStates(model)
    fused_loss, fused_grads = loss_and_grads(model, hidden)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 0
    for k in plain_grads:
        torch.testing.assert_close(fused_grads[k], plain_grads[k], rtol=1e-4, atol=1e-6)
    # Outside training the hook is inert: evaluation still sees every position's logits.
    out = model(input_ids=batch()["input_ids"])
    assert out.logits.shape[1] == 40


def test_selective_checkpointing_keeps_the_chosen_layers_and_the_gradients():
    _, full = loss_and_grads(tiny_lora_model(gc=True))
    model = tiny_lora_model(gc=True)
    kept = kernels.select_checkpointed_layers(model, 0.5)
    assert kept == [0, 2]
    layers = model.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False]
    _, selective = loss_and_grads(model)
    for k in full:
        torch.testing.assert_close(selective[k], full[k], rtol=1e-4, atol=1e-6)


def test_mfu_formula_reproduces_the_issue_baseline():
    """The peer loop's 5,333 tokens/s on the Llama-3-8B shape at 4 x 2048 is quoted as about 19% MFU on an
    H100 (4N + attention FLOPs per token, 989 TFLOP/s)."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32)
    counter = mfu.FlopCounter(8.03e9, cfg, "NVIDIA H100 80GB HBM3")
    steps = 10
    for _ in range(steps):
        counter.add([2048] * 4)
    utilization = counter.mfu(seconds=steps * 4 * 2048 / 5333)
    assert utilization == pytest.approx(0.19, abs=0.005)
    assert mfu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mfu.FlopCounter(1, cfg, None).mfu(1.0) is None  # CPU: no MFU
    assert mfu.example_lengths({"input_ids": [5] * 7, "position_ids": [0, 1, 2, 0, 1, 0, 1]}) == [3, 2, 2]
    assert mfu.example_lengths({"input_ids": [5] * 4}) == [4]


def tiny_4bit_llama(layers: int = 2):
    """(NF4 model on CPU, parameter count of the same model unquantized)."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    import tempfile
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    plain = LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        plain.save_pretrained(d)
        q = LlamaForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), device_map={"": "cpu"})
    q.config.use_cache = False
    q.train()  # in eval mode bitsandbytes' CPU backend repacks the weights for another (inference) kernel
    return q, sum(p.numel() for p in plain.parameters())


def test_base_param_count_unpacks_4bit_weights():
    q, expected = tiny_4bit_llama()
    assert sum(p.numel() for p in q.parameters()) < expected  # packed
    assert mfu.base_param_count(q) == expected


def test_the_flop_counter_knows_the_bitsandbytes_matmuls():
    """Compile's memory budget weighs what to recompute by FLOPs; bitsandbytes' matmuls must not count as 0."""
    from torch.utils.flop_counter import FlopCounterMode
    q, _ = tiny_4bit_llama()
    kernels.count_bitsandbytes_matmul_flops()
    layer = q.model.layers[0].mlp.gate_proj  # [128 x 64], 4-bit
    x = torch.randn(3, 5, 64)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * 15 * 128 * 64
    # The int8 matmuls of 8-bit layers (on GPU; called directly here): [15 x 64] int8 times [128 x 64] int8.
    ops = torch.ops.bitsandbytes
    a = torch.randint(-127, 127, (15, 64), dtype=torch.int8)
    b = torch.randint(-127, 127, (128, 64), dtype=torch.int8)
    with FlopCounterMode(display=False) as counter:
        ops.int8_scaled_mm(a, b, torch.rand(15), torch.rand(128))
        ops.int8_mixed_scaled_mm(torch.randn(15, 64, dtype=torch.float16), a, b, torch.rand(15), torch.rand(128))
    assert counter.get_total_flops() == 2 * (2 * 15 * 128 * 64)


def test_compiled_layers_under_a_memory_budget_give_the_eager_loss_and_gradients():
    """train.compile + compile_memory_budget on a 4-bit base: the compiler recomputes part of each layer in
    the backward pass; the loss and the LoRA gradients are the eager ones."""
    def lora(budget=None):
        q, _ = tiny_4bit_llama(layers=3)
        torch.manual_seed(1)
        model = attach_lora(q, LoraSection(r=4, alpha=8, dropout=0.0))  # dropout: compiled RNG differs
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give A gradients too
                p.data.normal_(0, 0.02)
        if budget is not None:
            assert kernels.compile_layers(model, budget) == 3
        return model

    from torch._dynamo.utils import counters
    eager_loss, eager = loss_and_grads(lora())
    graphs = counters["stats"]["unique_graphs"]
    try:
        compiled_loss, compiled = loss_and_grads(lora(budget=0.2))
        assert counters["stats"]["unique_graphs"] > graphs  # the layers did run compiled
    finally:
        kernels.set_activation_memory_budget(1.0)  # process-wide: leave the default to later tests
        torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)
    assert compiled.keys() == eager.keys() and len(eager) == 3 * 7 * 2
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("train.kernels=liger", "train.kernels=liger runs Triton GPU kernels and scaling.use_gpu is false"),
    ("train.checkpointed_fraction=0.5", "has no effect without train.gradient_checkpointing"),
    ("train.compile_memory_budget=0.2", "set train.compile=true, or remove compile_memory_budget"),
    ("train.compile_memory_budget=1.5", "train.compile_memory_budget: Input should be less than or equal to 1"),
    ("model.attn_implementation=flex_attention", "flex_attention trains on GPUs only .* use sdpa on CPU"),
])
def test_gpu_only_and_meaningless_speed_options_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "quickstart.yaml", [override])


def test_a_memory_budget_needs_layers_that_are_not_checkpointed():
    quickstart = ROOT / "configs" / "quickstart.yaml"
    with pytest.raises(ConfigError, match="no effect while every layer is checkpointed"):
        load_config(quickstart, ["train.compile=true", "train.gradient_checkpointing=true",
                                 "train.compile_memory_budget=0.2"])
    for ok in (["train.gradient_checkpointing=false"],
               ["train.gradient_checkpointing=true", "train.checkpointed_fraction=0.5"]):
        cfg = load_config(quickstart, ["train.compile=true", "train.compile_memory_budget=0.2", *ok])
        assert cfg.train.compile_memory_budget == 0.2


def test_fused_loss_on_a_softcapping_model_fails_before_ray(tmp_path, smollm_tokenizer, people_data):
    """Gemma-2 soft-caps its logits after the head, which the fused loss would skip: refused in prepare_job
    (the dry-run / driver step before any cluster), naming the key and the fix."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from qlora.jobs.base import prepare_job
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(smollm_tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=16)).save_pretrained(tmp_path / "gemma2")
    smollm_tokenizer.save_pretrained(tmp_path / "gemma2")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"model.name={tmp_path / 'gemma2'}", f"data.path={people_data}", "train.fused_cross_entropy=true"])
    with pytest.raises(ConfigError, match="train.fused_cross_entropy: this model transforms its logits "
                                          r"\(final_logit_softcapping\)") as e:
        prepare_job(cfg)
    assert "set train.fused_cross_entropy=false" in e.value.fix


def test_compiled_layers_compile_once_across_epochs_and_held_out_evaluation():
    """train.compile: after the first training step nothing compiles again, through an epoch boundary whose
    last micro-batch is topped up to full size, packed rows of other fills, and held-out evaluation and
    generation (run eagerly) between steps. On an H200 each of these had recompiled the decoder layer."""
    from torch._dynamo.utils import counters

    from qlora import evaluation
    from qlora.data import pack_examples
    from qlora.distributed import Context
    from qlora.batching import BatchPlan, model_inputs, train_batch
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in torch.randint(6, 30, (34,), generator=g).tolist():
        ids = torch.randint(0, 512, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * 3 + ids[3:]})
    rows = pack_examples(examples, 64)
    cfg = load_config(None, ["data.path=x.jsonl", "data.max_length=64", "data.packing=true", "train.batch_size=4",
                             "train.epochs=2"])
    plan = BatchPlan(len(rows), cfg, [len(r["input_ids"]) for r in rows])
    assert len(rows) % 4 and plan.total_steps > plan.per_epoch  # a short last batch, and a second epoch
    model = tiny_lora_model(layers=2)
    kernels.compile_layers(model)
    held_out = examples[:5]

    def evaluate():
        with kernels.for_evaluation(model, True):
            evaluation.eval_loss(model, held_out, 0, 2, Context(0, 1, torch.device("cpu")))
            model.generate(input_ids=torch.tensor([held_out[0]["input_ids"]]), max_new_tokens=3, do_sample=False)

    try:
        graphs = None
        before = counters["stats"]["unique_graphs"]  # a process-wide count: earlier tests compiled too
        evaluate()  # before training, as the worker does
        assert counters["stats"]["unique_graphs"] == before
        for k in range(plan.total_steps):
            _, idx = plan.micro_batch(k)
            assert len(idx) == 4
            b = evaluation.to_tensors(train_batch([rows[i] for i in idx], 0, True, 64), torch.device("cpu"))
            model.train()
            loss_sum, n = kernels.forward_loss(model, model_inputs(b), b["labels"])
            (loss_sum / n).backward()
            model.zero_grad()
            if k == 0:
                graphs = counters["stats"]["unique_graphs"]
                assert graphs > before  # the layers did compile
            if k in (1, plan.per_epoch - 1):
                evaluate()
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
