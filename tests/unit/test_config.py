"""The typed config: every shipped YAML loads; bad keys, types, values and combinations fail early
with the key path, the allowed values and exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora.config import JobConfig, flatten, load_config
from qlora.errors import ConfigError

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "benchmarks").rglob("*.yaml"))


def test_every_shipped_config_loads_and_names_its_command():
    assert len(CONFIGS) >= 2
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, JobConfig)
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python -m ray_jobs.") and str(path.relative_to(ROOT)) in first, path


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "data:\n  path: data/people_json.jsonl\n"


@pytest.mark.parametrize("extra, message", [
    ("lora:\n  rr: 8\n", "unknown key 'lora.rr' (did you mean 'r'?)"),
    ("trian:\n  epochs: 1\n", "unknown key 'trian' (did you mean 'train'?)"),
    ("lora:\n  r: eight\n", "lora.r: Input should be a valid integer"),
    ("lora:\n  r: 0\n", "lora.r: Input should be greater than 0"),
    ("train:\n  learning_rate: -1e-4\n", "train.learning_rate: Input should be greater than 0"),
    ("data:\n  path: x.jsonl\n  fraction: 1.5\n", "data.fraction: Input should be less than or equal to 1"),
    ("quantization:\n  bits: 3\n", "quantization.bits: Input should be 4, 8 or 16"),
    ("train:\n  optimizer: paged_adamw_32bit\n", "needs" if False else "scaling.use_gpu is false"),
    ("train:\n  warmup_steps: 5\n  warmup_ratio: 0.1\n", "keep one"),
    ("lora:\n  target_modules: []\n", "empty list"),
])
def test_bad_values_name_the_key(tmp_path, extra, message):
    text = extra if extra.startswith("data:") else BASE + extra
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["quantization.bits=8"], "LLM.int8 weights keep their scales inside the parameter"),
    (["scaling.use_gpu=true", "train.optimizer=paged_adamw_8bit"], "use train.optimizer=adamw"),
    (["train.optimizer=adamw_8bit", "train.cpu_optimizer_fallback=adamw", "scaling.use_gpu=true"], "bitsandbytes"),
    (["train.compile=true"], "set train.compile=false, or scaling.strategy=ddp"),
])
def test_fsdp_refuses_what_it_cannot_shard(tmp_path, overrides, message):
    """Each refused combination names scaling.strategy=fsdp, the other key, and both ways out."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), ["scaling.strategy=fsdp", "scaling.num_workers=2", *overrides])
    assert "scaling.strategy=fsdp" in str(err.value) and message in str(err.value)
    load_config(write(tmp_path, BASE), ["scaling.strategy=ddp", "scaling.num_workers=2", *overrides])  # DDP can
    # On CPU the GPU-only optimizer falls back to adamw, which FSDP can shard.
    cfg = load_config(write(tmp_path, BASE), ["scaling.strategy=fsdp", "train.optimizer=adamw_8bit",
                                              "train.cpu_optimizer_fallback=adamw"])
    assert cfg.optimizer_to_use() == "adamw"


@pytest.mark.parametrize("overrides, message", [
    (["scaling.zero_stage=3"], "scaling.zero_stage=3 (partitioned parameters) is not supported"),
    (["quantization.bits=8"], "use quantization.bits=4 (or 16), or scaling.strategy=ddp"),
    (["train.optimizer=sgd"], "set train.optimizer=adamw, or scaling.strategy=ddp"),
    (["scaling.use_gpu=true", "train.optimizer=paged_adamw_8bit"], "set train.optimizer=adamw"),
    (["train.compile=true"], "set train.compile=false, or scaling.strategy=ddp"),
])
def test_deepspeed_refuses_what_is_not_verified(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), ["scaling.strategy=deepspeed", "scaling.num_workers=2", *overrides])
    assert message in str(err.value)
    load_config(write(tmp_path, BASE), ["scaling.strategy=ddp", "scaling.num_workers=2", *overrides])  # DDP can
    for stage in (1, 2):
        cfg = load_config(write(tmp_path, BASE), ["scaling.strategy=deepspeed", f"scaling.zero_stage={stage}"])
        assert cfg.scaling.zero_stage == stage


def test_missing_data_section_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(write(tmp_path, "lora:\n  r: 8\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["lora.r=32", "train.learning_rate=1e-4",
                                              "lora.target_modules=[q_proj, v_proj]", "scaling.use_gpu=false"])
    assert cfg.lora.r == 32 and cfg.train.learning_rate == 1e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="unknown key 'lora.rank'"):
        load_config(write(tmp_path, BASE), ["lora.rank=4"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(write(tmp_path, BASE), ["lora.r"])


def test_json_round_trip_is_exact(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert JobConfig.from_json(cfg.to_json()) == cfg
    assert flatten(cfg)["lora.r"] == cfg.lora.r


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/does-not-exist.yaml"], "does not exist"),
    (["--config", "configs/quickstart.yaml", "--set", "lora.r=0"], "lora.r"),
    (["--config", "configs/quickstart.yaml", "--set", "data.path=missing.jsonl"], "missing.jsonl does not exist"),
    (["--config", "configs/quickstart.yaml", "--set", "model.name=./no/model"], "not an existing path"),
    (["--config", "configs/quickstart.yaml", "--set", "lora.target_modules=[nonexistent_proj]"], "matches no module"),
])
def test_cli_bad_input_exits_2_with_json_last_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.train", *args, "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["exit_code"] == 2 and message in last["error"]
    assert message in proc.stderr and "fix:" in proc.stderr


# Any mapping either validates or raises our ConfigError, never a raw traceback.
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8))
keys = st.sampled_from(["model", "lora", "data", "train", "r", "alpha", "path", "bits", "scaling", "x", "fraction"])
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(keys, values, max_size=5))
def test_fuzz_config_loader(tmp_path, doc):
    p = tmp_path / "fuzz.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        load_config(p)
    except ConfigError:
        pass


def test_a_gpu_only_optimizer_falls_back_on_cpu_only_when_the_config_says_so(tmp_path):
    import torch

    from qlora.train_step import make_optimizer
    base = {"data": {"path": "x.jsonl"}, "train": {"optimizer": "paged_adamw_32bit"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match="cpu_optimizer_fallback=adamw"):
        load_config(tmp_path / "job.yaml")
    cfg = JobConfig.model_validate({**base, "train": {"optimizer": "paged_adamw_32bit", "cpu_optimizer_fallback": "sgd"}})
    assert cfg.optimizer_to_use() == "sgd"
    assert isinstance(make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))]), torch.optim.SGD)
    on_gpu = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"use_gpu": True})})
    assert on_gpu.optimizer_to_use() == "paged_adamw_32bit"  # the fallback is for CPU only


def test_deepspeed_without_the_package_fails_before_anything_loads(tmp_path, monkeypatch):
    """The driver's first check: no model, tokenizer or data is read (the data file here does not exist)
    and no cluster starts. The package is installed in this environment, so its absence is simulated."""
    import importlib.util

    from qlora.jobs.base import prepare_job
    from qlora.errors import EnvironmentProblem
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    cfg = load_config(write(tmp_path, BASE), ["scaling.strategy=deepspeed", "scaling.num_workers=2",
                                              f"data.path={tmp_path / 'absent.jsonl'}"])
    with pytest.raises(EnvironmentProblem) as err:
        prepare_job(cfg)
    assert "deepspeed package is not installed" in str(err.value) and "qlora-ray[deepspeed]" in str(err.value)


def test_the_configuration_reference_is_current_and_documents_every_key():
    from qlora.config_reference import render
    text = render()
    assert (ROOT / "docs" / "config.md").read_text() == text, "run: python -m qlora.config_reference > docs/config.md"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 80 and all(not line.rstrip().endswith("|  |") for line in rows)  # each key has its words
