"""Every config under configs/ (recursively, whoever added it) passes `python -m ray_jobs.train --dry-run`,
and the LoRA trainable count it prints equals one computed here from the model's config.json alone.

GPU configs name hub models that cannot be downloaded here, so the test builds an offline Hugging Face
cache (HF_HOME in a temporary folder, models--ORG--NAME/snapshots/<sha>/ + refs/main) holding each
model's published config.json values and a real tokenizer from ../shared/data/tokenizers:
  meta-llama/Meta-Llama-3-8B   Llama 3's own tiktoken BPE ranks (128,000 tokens) + its 256 special tokens
  meta-llama/Meta-Llama-3-70B  the same tokenizer
  huggyllama/llama-7b          Meta's LLaMA SentencePiece model (the 32,000-token file Llama 2 also uses)
  Qwen/Qwen2.5-7B-Instruct     the Qwen2 tokenizer (same BPE and ChatML; Qwen2.5's template adds a default
                               system prompt this one lacks)
  google/gemma-2-9b            NOT Gemma's tokenizer (not available offline): the LLaMA SentencePiece model
                               stands in, so token counts for Gemma configs are only indicative.
A config naming a hub model missing from HUB_MODELS fails with a message saying what to add.

Data paths of GPU configs point at user files (full data sets); where the file does not exist here the test
points data.path / data.eval_path at a small file of the config's format (--set). GPU configs set
scaling.use_gpu=true, which preflight refuses on a machine without a GPU when the job would start a local Ray
cluster (the workers would wait forever); the test passes --set scaling.ray_address=<remote head> so the
dry-run checks the config as it would be submitted to a GPU cluster (dry-run contacts no service).
All configs run in ONE subprocess (HF_HOME must be set before huggingface_hub is imported).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, documented_commands

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# Every `python -m ray_jobs.train` command the README and docs/ show, as written (its --set values included).
DOCUMENTED = sorted({" ".join(c[2:]): c[2:] for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
                     for c in documented_commands(f.read_text()) if c[1] == "ray_jobs.train"}.items())
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
LLAMA_ARCHS = ("llama", "qwen2", "gemma2", "mistral")

HUB_MODELS = {
    "meta-llama/Meta-Llama-3-8B": ("llama3", {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256}),
    "meta-llama/Meta-Llama-3-70B": ("llama3", {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 8192,
        "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 8192,
        "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256}),
    "huggyllama/llama-7b": ("llama_sp", {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 2048,
        "max_sequence_length": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "pad_token_id": 0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_cache": True, "vocab_size": 32000}),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}),
    "google/gemma-2-9b": ("llama_sp", {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
        "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": 256000}),
}
# The Instruct model's config differs from the base's in its end-of-sequence token (<|eot_id|>).
HUB_MODELS["meta-llama/Meta-Llama-3-8B-Instruct"] = ("llama3_instruct", {**HUB_MODELS["meta-llama/Meta-Llama-3-8B"][1],
                                                                        "eos_token_id": 128009})


# A few records per format, for GPU configs whose data files are the user's (full data sets).
SAMPLES = {
    "alpaca": lambda i: {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)},
    "qa": lambda i: {"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"},
    "multiple_choice": lambda i: {"question": f"Is {i} even?", "choices": ["no", "yes"], "answer": int(i % 2 == 0)},
    "text": lambda i: {"text": f"Once upon a time there were {i} cats."},
    "messages": lambda i: {"messages": [{"role": "user", "content": f"Say {i}."},
                                        {"role": "assistant", "content": str(i)}]},
    "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]},
    "preference": lambda i: {"prompt": f"Say {i}.",  # UltraFeedback-binarized: the conversations hold the prompt
                             "chosen": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}],
                             "rejected": [{"role": "user", "content": f"Say {i}."},
                                          {"role": "assistant", "content": "no"}]},
    "pairwise": lambda i: {"prompt": f"Name {i}.", "response_a": str(i), "response_b": "no",
                           "winner_model_a": int(i % 3 == 0),
                           "winner_model_b": int(i % 3 == 1), "winner_tie": int(i % 3 == 2)},
}


def sample_record(cfg, i: int) -> dict:
    fmt = cfg.data.format if cfg.data.format != "auto" else "alpaca"
    if fmt == "classification":  # the config names its columns
        return {cfg.data.text_column: f"a {'good' if i % 2 else 'bad'} film, number {i}", cfg.data.label_column: i % 2}
    return SAMPLES[fmt](i)


# Llama-3-Instruct's chat template, as published in its tokenizer_config.json.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def write_llama3_tokenizer(folder: Path, chat_template: str | None = None) -> None:
    """Llama 3's tokenizer from its tiktoken ranks file, through transformers' own TikTokenConverter
    (whose default split pattern is Llama 3's), reading the ranks without the tiktoken package."""
    import base64

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):
            ranks = {}
            for line in Path(path).read_text().splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            return ranks

    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)] + [
        "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + [
        f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    tok = Converter(str(SHARED / "tokenizers" / "llama3" / "tokenizer.model"), extra_special_tokens=specials).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   model_max_length=8192)
    assert len(fast) == 128256 and fast.convert_tokens_to_ids("<|eot_id|>") == 128009
    fast.chat_template = chat_template
    fast.save_pretrained(folder)


def write_tokenizer(kind: str, folder: Path) -> None:
    if kind == "llama3":
        write_llama3_tokenizer(folder)
    elif kind == "llama3_instruct":
        write_llama3_tokenizer(folder, LLAMA3_CHAT_TEMPLATE)
    elif kind == "llama_sp":
        import shutil

        from transformers import LlamaTokenizer
        shutil.copy(SHARED / "tokenizers" / "llama2" / "tokenizer.model", folder / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(folder)  # needs the sentencepiece package to read the model
        assert len(tok) == 32000 and tok.encode("Hello world", add_special_tokens=False) == [15043, 3186]
        tok.save_pretrained(folder)
    elif kind == "qwen2":
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2").save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    for name, (kind, config) in HUB_MODELS.items():
        repo = home / "hub" / f"models--{name.replace('/', '--')}"
        snap = repo / "snapshots" / SNAPSHOT
        snap.mkdir(parents=True)
        write_tokenizer(kind, snap)
        (snap / "config.json").write_text(json.dumps(config))  # after the tokenizer: its save writes no config
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(SNAPSHOT)
    return home


def independent_lora_count(model_config: dict, lora) -> int:
    """r * (in + out) summed over the adapted projections of a Llama-family decoder, from config.json alone."""
    h, heads = model_config["hidden_size"], model_config["num_attention_heads"]
    kv, inter = model_config.get("num_key_value_heads") or heads, model_config["intermediate_size"]
    hd = model_config.get("head_dim") or h // heads
    dims = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    names = list(dims) if lora.target_modules == "all-linear" else lora.target_modules
    layers = (len(lora.layers_to_transform) if lora.layers_to_transform is not None
              else model_config["num_hidden_layers"] - lora.skip_first_layers)
    return lora.r * layers * sum(sum(dims[n]) for n in names)


def dry_run_overrides(path: Path, cfg, tmp: Path) -> list[str]:
    out = ["--set", f"scaling.storage_path={tmp / 'runs'}", "--set", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
    if cfg.scaling.use_gpu:  # see the module docstring: checked as if submitted to a GPU cluster
        out += ["--set", "scaling.ray_address=gpu-head.invalid:6379"]
    for key in ("path", "eval_path"):
        value = getattr(cfg.data, key)
        if value and not (ROOT / value).is_file():
            sample = tmp / f"{path.stem}-{key}.jsonl"
            sample.write_text("".join(json.dumps(sample_record(cfg, i + (100 if key == "eval_path" else 0))) + "\n"
                                      for i in range(24)))
            out += ["--set", f"data.{key}={sample}"]
    return out


def test_every_config_and_documented_command_passes_dry_run(hf_home, tmp_path, smollm_dir):
    from qlora.config import load_config
    assert len(CONFIGS) >= 7, CONFIGS  # quickstart + this six; other helpers add more
    jobs, expected = [], {}
    for path in CONFIGS:
        cfg = load_config(path)
        if cfg.model.name == "smollm2-135m":
            model_config = json.loads((smollm_dir / "config.json").read_text())
        else:
            assert cfg.model.name in HUB_MODELS, (
                f"{path.relative_to(ROOT)} names {cfg.model.name}: add its published config.json and the closest "
                "tokenizer to HUB_MODELS in tests/e2e/test_configs_dry_run.py")
            model_config = HUB_MODELS[cfg.model.name][1]
        if model_config["model_type"] in LLAMA_ARCHS:
            expected[str(path)] = independent_lora_count(model_config, cfg.lora)
        jobs.append([str(path), ["--config", str(path), "--dry-run", *dry_run_overrides(path, cfg, tmp_path)]])
    for command, args in DOCUMENTED:  # the documented lines, with the same stand-ins for hub data and GPU clusters
        path = ROOT / args[args.index("--config") + 1]
        extra = [] if "--dry-run" in args else ["--dry-run"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        jobs.append([command, [*args, *extra, *dry_run_overrides(path, load_config(path, sets), tmp_path)]])
    script = """
import contextlib, io, json, sys
from ray_jobs.train import main
results = {}
for key, argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    results[key] = {"code": code, "last": out.getvalue().strip().splitlines()[-1], "stdout": out.getvalue()[-4000:]}
print(json.dumps(results))
"""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "QLORA_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in CONFIGS:
        r = results[str(path)]
        assert r["code"] == 0, f"{path.relative_to(ROOT)}: {r['last']}\n{r['stdout']}"
        summary = json.loads(r["last"])
        assert summary["records"] > 0 and "LoRA trainable parameters" in r["stdout"]
        assert summary["gpu_memory_estimate_gib"] > 0 and "GPU memory per worker, estimated" in r["stdout"]
        if str(path) in expected:
            assert summary["trainable_params"] == expected[str(path)], path
    assert len(DOCUMENTED) >= 10, DOCUMENTED
    for command, _ in DOCUMENTED:
        r = results[command]
        assert r["code"] == 0 and json.loads(r["last"])["records"] > 0, f"python -m ray_jobs.train {command}: {r['last']}"
    llama3 = next(p for p in CONFIGS if p.name == "gsm8k_llama3_8b_4bit.yaml")
    # 16 x 32 layers x 81,920: the known Llama-3-8B r=16 count
    assert json.loads(results[str(llama3)]["last"])["trainable_params"] == 41_943_040
