"""A catalogue of bad input (config, model files, data, environment, search spaces). Every case must
end with exit code 2 and a message that names the problem and the fix, before any training step or
cluster resource is used, and leave nothing behind (no storage folder, no mlflow.db, no MLflow run).

Most cases run the real command line in-process (`ray_jobs.train.main([...])`, so a case costs a
fraction of a second instead of a Python start with torch); `runtime.connect_ray` is replaced by a
tripwire, so a check that is missing fails the test instead of starting a cluster. A handful run as
real subprocesses (started together at the beginning, in parallel), one of them a real training run
that checks secrets from the environment end up in no output. The environment checks of
`qlora.preflight` (which the drivers run before storage, MLflow and Ray) are also tested directly.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from qlora import modeling, preflight
from qlora import runtime
from qlora.config import load_config
from qlora.errors import EnvironmentProblem
from qlora.model_source import ModelSource, packaged_gguf, resolve

from conftest import ROOT, SHARED

PEOPLE = ROOT / "data" / "people_json.jsonl"
SECRET = "qlora-TEST-SECRET-7f3a9c"  # put where a user would keep credentials; must never come out


# --- harness -----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    code: int
    out: str
    err: str
    new_files: list[str]

    @property
    def last(self) -> dict:
        return json.loads(self.out.strip().splitlines()[-1])


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(argv: list[str], entry: str = "train") -> Outcome:
    """The real command line (`python -m ray_jobs.<entry> ARGV`) in this process, in the current folder."""
    from ray_jobs import sweep as sweep_cli
    from ray_jobs import train as train_cli
    main = {"train": train_cli.main, "sweep": sweep_cli.main}[entry]
    before = _tree(Path.cwd())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return Outcome(code, out.getvalue(), err.getvalue(), sorted(_tree(Path.cwd()) - before))


def assert_bad_input(o: Outcome, problem, fix, error_type: str | None = None) -> str:
    """Exit code 2; the message names the problem and the fix; nothing was written. Returns the message."""
    assert o.code == 2, f"exit code {o.code}\nstdout: {o.out[-2000:]}\nstderr: {o.err[-2000:]}"
    last = o.last
    assert last["exit_code"] == 2
    if error_type:
        assert last["error_type"] == error_type, last
    message = last["error"]
    assert f"error: {message}" in o.err  # the same message on stderr, for people
    what, sep, how = message.partition("\n  fix: ")
    assert sep, f"no fix in: {message}"
    for text in [problem] if isinstance(problem, str) else problem:
        assert text in what, f"{text!r} not in the problem: {what}"
    for text in [fix] if isinstance(fix, str) else fix:
        assert text in how, f"{text!r} not in the fix: {how}"
    assert not o.new_files, f"bad input left files behind: {o.new_files}"
    return message


@pytest.fixture(autouse=True)
def work(tmp_path, monkeypatch) -> Path:
    """Each case runs in an empty folder: the default storage (runs/) and MLflow store (mlflow.db) would
    land here. Ray is a tripwire: reaching it means a check ran too late."""
    for var in ("QLORA_HOME", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_JOB_SUBMISSION_ID"):
        monkeypatch.delenv(var, raising=False)

    def no_ray(*args, **kwargs):
        raise AssertionError("bad input reached runtime.connect_ray: a check runs too late")

    monkeypatch.setattr(runtime, "connect_ray", no_ray)
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def job(work: Path, extra: dict | None = None, name: str = "job.yaml", **sections) -> str:
    """A small valid config merged with `sections` (callers give the model); returns its file name."""
    cfg = {"data": {"path": str(PEOPLE), "max_samples": 16, "eval_max_samples": 4, "max_length": 128},
           "evaluation": {"generate": False}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    cfg.update(extra or {})
    (work / name).write_text(yaml.safe_dump(cfg))
    return name


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Damaged and unusual copies of the tiny model folder."""
    from safetensors.torch import load_file
    from transformers import GPT2TokenizerFast

    root = tmp_path_factory.mktemp("models")

    def copy(name: str, *skip: str) -> Path:
        dst = root / name
        dst.mkdir()
        for f in tiny_model_dir.iterdir():
            if f.name not in skip:
                shutil.copy(f, dst / f.name)
        return dst

    def edit_config(folder: Path, **changes):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))

    out = {"tiny": tiny_model_dir}
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    out["pickle"] = copy("pickle", "model.safetensors")
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), out["pickle"] / "pytorch_model.bin")
    out["truncated"] = copy("truncated", "model.safetensors")
    (out["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    out["garbage"] = copy("garbage", "model.safetensors")
    (out["garbage"] / "model.safetensors").write_bytes(os.urandom(4096))
    out["bad_config"] = copy("bad_config")
    (out["bad_config"] / "config.json").write_text('{"model_type": "llama", "hidden_size": 6')
    out["no_tokenizer"] = copy("no_tokenizer", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    out["remote"] = copy("remote")
    edit_config(out["remote"], model_type="qlora_custom",
                auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (out["remote"] / "custom.py").write_text(
        f"open({str(root / 'REMOTE_CODE_RAN')!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'qlora_custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    out["unknown_type"] = copy("unknown_type")
    edit_config(out["unknown_type"], model_type="qlora_unknown")
    out["small_vocab"] = copy("small_vocab")
    edit_config(out["small_vocab"], vocab_size=1000)
    # GPT-2's real tokenizer (no chat template) on a model whose embedding fits its 50,257 tokens.
    out["gpt2"] = copy("gpt2", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    edit_config(out["gpt2"], vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    GPT2TokenizerFast.from_pretrained(SHARED / "tokenizers" / "gpt2").save_pretrained(out["gpt2"])
    gguf = packaged_gguf("smollm2-135m").read_bytes()
    out["gguf_header_only"] = root / "header-only.gguf"
    out["gguf_header_only"].write_bytes(gguf[:4096])
    out["gguf_truncated"] = root / "truncated.gguf"
    out["gguf_truncated"].write_bytes(gguf[: len(gguf) // 3])
    out["remote_marker"] = root / "REMOTE_CODE_RAN"
    return out


def write(work: Path, name: str, text: str) -> str:
    (work / name).write_text(text)
    return str(work / name)


# --- config: caught when the YAML is read ------------------------------------------------------------

CONFIG_CASES = [
    # id, YAML sections, --set overrides, problem, fix
    ("misspelt key in the YAML", {"data": {"path": str(PEOPLE), "max_lenght": 64}}, [],
     "unknown key 'data.max_lenght' (did you mean 'max_length'?)", "rename or remove 'data.max_lenght'"),
    ("unknown section", {}, ["optimizer.lr=1e-3"],
     ["unknown key 'optimizer'", "allowed here: model, quantization, lora, data"], "rename or remove 'optimizer'"),
    ("wrong type: int", {}, ["data.max_samples=many"],
     "data.max_samples: Input should be a valid integer", "change 'data.max_samples'"),
    ("wrong type: bool", {}, ["scaling.use_gpu=maybe"],
     "scaling.use_gpu: Input should be a valid boolean", "change 'scaling.use_gpu'"),
    ("rank 0", {}, ["lora.r=0"], "lora.r: Input should be greater than 0 (got 0)", "change 'lora.r'"),
    ("negative learning rate", {}, ["train.learning_rate=-1e-4"],
     "train.learning_rate: Input should be greater than 0", "change 'train.learning_rate'"),
    ("fraction above 1", {}, ["data.fraction=1.5"],
     "data.fraction: Input should be less than or equal to 1", "change 'data.fraction'"),
    ("dropout 1", {}, ["lora.dropout=1.0"], "lora.dropout: Input should be less than 1", "change 'lora.dropout'"),
    ("max_length below 8", {}, ["data.max_length=4"],
     "data.max_length: Input should be greater than or equal to 8", "change 'data.max_length'"),
    ("8-bit with a 4-bit option", {}, ["quantization.bits=8", "quantization.quant_type=fp4"],
     ["quantization.quant_type=fp4 is a 4-bit option but quantization.bits is 8",
      "set quantization.bits=4, or remove quant_type"], "change 'quantization'"),
    ("warmup steps and ratio", {}, ["train.warmup_steps=2", "train.warmup_ratio=0.1"],
     "train.warmup_steps and train.warmup_ratio are both set: keep one", "change 'train'"),
    ("warmup longer than training", {}, ["train.max_steps=4", "train.warmup_steps=10"],
     ["train.warmup_steps=10 is not below train.max_steps=4", "lower warmup_steps"], "change 'train'"),
    ("CUDA optimizer on CPU", {}, ["train.optimizer=paged_adamw_8bit"],
     ["bitsandbytes CUDA optimizer", "use train.optimizer=adamw"], "in the YAML file or a --set override"),
    ("float16 compute on CPU", {}, ["quantization.compute_dtype=float16"],
     "use auto or float32 on CPU", "in the YAML file or a --set override"),
    ("data.path missing", {"data": {"format": "alpaca"}}, [],
     "missing required key 'data.path'", "add 'data.path'"),
    ("elastic minimum above the maximum", {}, ["scaling.num_workers=2", "scaling.min_workers=3"],
     "scaling.min_workers=3 is above scaling.num_workers=2: set min_workers <= num_workers",
     "in the YAML file or a --set override"),
    ("elastic range that cannot keep the global batch", {}, ["scaling.num_workers=4", "scaling.min_workers=2"],
     ["a step's 4 micro-batches", "cannot be split evenly over 3 workers", "set train.gradient_accumulation=3"],
     "in the YAML file or a --set override"),
    ("password in tracking.uri", {}, [f"tracking.uri=http://alice:{SECRET}@127.0.0.1:5000"],
     ["tracking.uri http://alice:***@127.0.0.1:5000 carries a password", "MLFLOW_TRACKING_PASSWORD"],
     "change 'tracking'"),
]


@pytest.mark.parametrize("sections, sets, problem, fix", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_config_case(work, models, sections, sets, problem, fix):
    path = job(work, extra=sections, model={"name": str(models["tiny"])})
    o = run_cli(["--config", path, *[a for s in sets for a in ("--set", s)], "--dry-run"])
    assert_bad_input(o, problem, fix, "ConfigError")
    assert SECRET not in o.out + o.err


def test_config_file_not_yaml(work):
    write(work, "job.yaml", "model: [unclosed\ndata: {path: x}\n")
    assert_bad_input(run_cli(["--config", "job.yaml", "--dry-run"]), "is not valid YAML", "fix the YAML syntax")


# --- model files -------------------------------------------------------------------------------------

MODEL_CASES = [
    # id, model folder (key of `models`, or a path under the work folder), problem, fix
    ("model path missing", "./models/nope", "is not an existing path", "give an existing folder"),
    ("config.json not JSON", "bad_config", "config.json is not valid JSON", "restore config.json"),
    ("safetensors truncated", "truncated", ["is damaged or truncated", "described by its header"], "re-download"),
    ("safetensors garbage", "garbage", ["is damaged or truncated", "not a safetensors file"], "re-download"),
    ("only pickle weights", "pickle", "holds only pickle weights",
     ["convert the weights to safetensors", "model.allow_pickle=true"]),
    ("GGUF cut after 4 KiB", "gguf_header_only", ["could not be read", "the file is truncated"], "re-download"),
    ("GGUF cut at a third", "gguf_truncated", ["could not be read", "its tensors need 98362432"], "re-download"),
    ("needs remote code", "remote", ["needs Python code shipped with the model", "model.trust_remote_code is false"],
     "set model.trust_remote_code=true only if you trust them"),
    ("no tokenizer files", "no_tokenizer", "the tokenizer of", "copy the model's tokenizer files"),
    ("tokenizer larger than the embedding", "small_vocab", "has 49,152 tokens but the model embeds only 1,000",
     "use the tokenizer files that belong to this model"),
    ("model_type unknown to transformers", "unknown_type", "could not be used", "model_type"),
]


@pytest.mark.parametrize("model, problem, fix", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model_case(work, models, monkeypatch, tmp_path, model, problem, fix):
    cache = tmp_path / "cache"  # a GGUF conversion would land here
    monkeypatch.setenv("QLORA_CACHE", str(cache))
    started = time.perf_counter()
    o = run_cli(["--config", job(work, model={"name": str(models.get(model, model))})])
    assert_bad_input(o, problem, fix, "ConfigError")
    assert time.perf_counter() - started < 20  # a full load of the truncated GGUF took 35 s before its check
    assert not cache.exists() or not any(cache.rglob("*"))
    assert not models["remote_marker"].exists(), "the model's own code ran without trust_remote_code"


def test_lora_that_adapts_nothing(work, models):
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])}), "--set", "lora.target_modules=[q_proj]",
                 "--set", "lora.layers_to_transform=[99]", "--dry-run"])
    assert_bad_input(o, "LoRA adapts nothing", "valid layer indices")


def test_pickle_weights_load_only_when_allowed(work, models):
    """--dry-run accepts them with model.allow_pickle=true (warning loudly); the loader itself asks
    transformers for safetensors only, so even a source that slips past the check is refused."""
    o = run_cli(["--config", job(work, model={"name": str(models["pickle"]), "allow_pickle": True}), "--dry-run"])
    assert o.code == 0, o.err[-2000:]
    assert "WARNING: model.allow_pickle=true" in o.out
    cfg = load_config(job(work, model={"name": str(models["pickle"])}), ["quantization.bits=16"])
    lying = ModelSource(str(models["pickle"]), True, "claims safetensors")  # pickle_only not set
    with pytest.raises(OSError, match="safetensors"):
        modeling.load_base_model(cfg, lying, torch.device("cpu"))
    allowed = cfg.model_copy(update={"model": cfg.model.model_copy(update={"allow_pickle": True})})
    assert modeling.load_base_model(allowed, resolve(str(models["pickle"])), torch.device("cpu")) is not None


def test_trust_remote_code_is_off_unless_set_and_logged_loudly_when_on(work, models):
    """Off: the model that ships code is refused (its code never runs; see the "needs remote code" case)
    and no warning is printed for an ordinary model. On: --dry-run warns before anything is loaded."""
    quiet = run_cli(["--config", job(work, model={"name": str(models["tiny"])}), "--dry-run"])
    assert quiet.code == 0 and "trust_remote_code: false" in quiet.out and "WARNING" not in quiet.out
    loud = run_cli(["--config", job(work, model={"name": str(models["tiny"]), "trust_remote_code": True}),
                    "--dry-run"])
    assert loud.code == 0, loud.err[-2000:]
    assert "WARNING: model.trust_remote_code=true runs Python code from the model repository" in loud.out
    assert loud.out.index("WARNING") < loud.out.index("# resolved config")  # printed first, before loading


def test_shipped_gguf_passes_the_header_check():
    from qlora.model_source import check_gguf
    check_gguf(packaged_gguf("smollm2-135m"))  # the real file must not trip the truncation check


# --- data --------------------------------------------------------------------------------------------

ALPACA_OK = '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
DATA_CASES = [
    # id, data file name, its content (None: not created), extra data settings, problem, fix
    ("file missing", "nope.jsonl", None, {}, "data.path: data file", "check data.path"),
    ("file empty", "d.jsonl", "", {}, "is empty", "point data.path at a file with records"),
    ("only blank lines", "d.jsonl", "\n\n\n", {}, "is empty (only blank lines)", "point data.path at a file"),
    ("invalid JSON", "d.json", '[{"instruction": "a", "output": "b"},', {}, "could not be parsed as json",
     "fix the file so it is valid json"),
    ("unknown extension", "d.txt", "hello", {}, "unknown extension '.txt'", "use a .json, .jsonl, .csv"),
    ("columns of no format", "d.csv", "prompt,completion\nq,a\nq2,a2\n", {}, "cannot tell the data format",
     "set data.format"),
    ("columns missing for the format", "people", None, {"format": "messages"}, "lacks column(s) ['messages']",
     "set data.format to match the file"),
    ("null answer", "d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": null}\n', {},
     "record 2: 'output' is null or missing", "every alpaca record needs string instruction and output"),
    ("text is a number", "d.jsonl", '{"text": "x"}\n{"text": 5}\n{"text": 6}\n', {"format": "text"},
     "record 2: 'text' is int, not a string (and 1 more records)", "every text record needs a string text"),
    ("messages is a string", "d.jsonl", '{"messages": "hi"}\n{"messages": "there"}\n', {},
     "record 1: 'messages' is 'hi', not a non-empty list", "a list of {role, content}"),
    ("conversation without an answer", "d.jsonl",
     '{"conversations": [{"from": "human", "value": "a"}]}\n{"conversations": [{"from": "human", "value": "b"}]}\n',
     {}, "no assistant message to learn from", "at least one assistant (gpt) turn"),
    ("one record, nothing to hold out", "d.jsonl", '{"instruction": "a", "output": "b"}\n', {},
     "too few to hold some out", "set data.eval_path"),
    ("every answer truncated away", "people", None, {"max_length": 8}, "lose every answer token",
     "raise data.max_length"),
    ("fraction leaves zero records", "people", None, {"fraction": 0.0001, "max_samples": None},
     "data.fraction=0.0001 of the 720 training records is 0 records", "raise data.fraction to at least 0.00139"),
    ("eval_path missing", "people", None, {"eval_path": "held_out.jsonl"},
     "data.eval_path: data file held_out.jsonl does not exist", "check data.eval_path"),
    ("eval_path is the training file", "people", None, {"eval_path": str(PEOPLE)},
     "data.eval_path is the training file itself", "point data.eval_path at a separate file"),
]


@pytest.mark.parametrize("name, content, settings, problem, fix", [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_data_case(work, models, tmp_path, name, content, settings, problem, fix):
    if name == "people":
        path = str(PEOPLE)
    elif content is None:
        path = name
    else:  # the data file lives outside the work folder, so "nothing left behind" is exact
        (tmp_path / name).write_text(content)
        path = str(tmp_path / name)
    cfg = job(work, model={"name": str(models["tiny"])}, data={"path": path, **settings})
    assert_bad_input(run_cli(["--config", cfg, "--dry-run"]), problem, fix, "DataError")


def test_chat_format_with_a_tokenizer_without_chat_template(work, models, tmp_path):
    """The real GPT-2 tokenizer has no chat template: messages cannot be rendered."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(4)))
    cfg = job(work, model={"name": str(models["gpt2"])}, data={"path": str(data)})
    assert_bad_input(run_cli(["--config", cfg, "--dry-run"]), "the tokenizer has no chat template",
                     "data.format=alpaca / text", "DataError")


def test_max_samples_larger_than_the_data_is_fine(work, models):
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])}, data={"max_samples": 10**6}),
                 "--dry-run"])
    assert o.code == 0, o.err[-2000:]
    assert o.last["records"] == 720  # every training record: 800 in the file, 80 held out (eval_fraction 0.1)


def test_the_base_config_of_this_catalogue_is_valid(work, models):
    """Control: without the bad input, the same config passes --dry-run (so each case fails for its own reason)."""
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])}), "--dry-run"])
    assert o.code == 0, o.err[-3000:]
    assert o.last["records"] == 16
    # A valid dry run prepares the data into the cache (the job then reuses it), and writes nothing else.
    assert o.new_files and all(f == "runs" or f.startswith("runs/data_cache") for f in o.new_files), o.new_files


# --- environment: through the command line where the driver checks it today -------------------------

def test_storage_under_a_regular_file(work, models):
    (work / "taken").write_text("a file, not a folder")
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])},
                                 scaling={"storage_path": "taken/runs"})])
    assert_bad_input(o, ["scaling.storage_path", "taken/runs"], "choose a folder you can write to",
                     "EnvironmentProblem")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_storage_in_a_folder_nobody_may_write(work, models):
    """sysfs refuses new entries even to root (a chmod 500 folder does not stop root: see the preflight test)."""
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])},
                                 scaling={"storage_path": "/sys/qlora-runs"})])
    assert_bad_input(o, ["scaling.storage_path /sys/qlora-runs", "not writable"], "choose a folder you can write to",
                     "EnvironmentProblem")


def test_unreachable_mlflow_through_the_command_line(work, models):
    started = time.perf_counter()
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])}), "--set",
                 "tracking.uri=http://127.0.0.1:1"])
    assert o.code == 2, o.err[-2000:]
    assert "MLflow tracking server http://127.0.0.1:1" in o.last["error"] and "fix tracking.uri" in o.last["error"]
    assert "mlflow.db" not in o.new_files and time.perf_counter() - started < 20


def test_unreachable_mlflow_leaves_no_storage_folder(work, models):
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])}), "--set",
                 "tracking.uri=http://127.0.0.1:1"])
    assert_bad_input(o, "is unreachable", "tracking.uri")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_without_a_gpu_through_the_command_line(work, models):
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])}), "--set", "scaling.use_gpu=true"])
    assert_bad_input(o, "has no CUDA GPU", "scaling.use_gpu=false")


def test_unreachable_ray_through_the_command_line(work, models):
    o = run_cli(["--config", job(work, model={"name": str(models["tiny"])}), "--set",
                 "scaling.ray_address=127.0.0.1:1"])
    assert_bad_input(o, "is unreachable", "ray start --head")


# --- environment: qlora.preflight, which the drivers call before storage, MLflow and Ray ----------

def _cfg(work: Path, models, *sets: str):
    return load_config(job(work, model={"name": str(models["tiny"])}), list(sets))


def _preflight_fails(cfg, problem, fix, network=True, seconds=10.0) -> str:
    started = time.perf_counter()
    with pytest.raises(EnvironmentProblem) as err:
        preflight.check(cfg, network=network)
    assert time.perf_counter() - started < seconds
    for text in [problem] if isinstance(problem, str) else problem:
        assert text in err.value.problem, err.value.problem
    assert fix in err.value.fix, err.value.fix
    return str(err.value)


def test_preflight_passes_a_good_config_and_writes_nothing(work, models):
    cfg = _cfg(work, models)
    before = _tree(work)
    preflight.check(cfg, network=True)
    assert _tree(work) == before  # no runs/, no mlflow.db: only probed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_preflight_gpu_without_a_gpu(work, models):
    _preflight_fails(_cfg(work, models, "scaling.use_gpu=true"), "has no CUDA GPU", "set scaling.use_gpu=false",
                     network=False)
    # A remote cluster may have GPUs this machine lacks: not judged here.
    preflight.check_compute(_cfg(work, models, "scaling.use_gpu=true", "scaling.ray_address=10.0.0.5:6379"))


def test_preflight_more_workers_than_local_cpus(work, models):
    n = preflight.local_cpus() + 1
    _preflight_fails(_cfg(work, models, f"scaling.num_workers={n}"), f"needs {n} CPUs",
                     "lower scaling.num_workers or scaling.cpus_per_worker", network=False)


def test_preflight_custom_resource_on_a_local_cluster(work, models):
    _preflight_fails(_cfg(work, models, "scaling.resources_per_worker={TPU: 1}"), "asks for TPU",
                     "ray start --resources", network=False)


def test_preflight_accelerator_type_on_a_local_cluster(work, models):
    _preflight_fails(_cfg(work, models, "scaling.accelerator_type=A10G"), "declares no accelerator type",
                     "drop scaling.accelerator_type", network=False)


def test_preflight_unreachable_ray_address_fails_in_seconds(work, models):
    msg = _preflight_fails(_cfg(work, models, "scaling.ray_address=127.0.0.1:1"),
                           ["Ray cluster at 127.0.0.1:1 (scaling.ray_address) is unreachable", "127.0.0.1:1"],
                           "ray start --head --port=1")
    assert "fix scaling.ray_address" in msg


def test_preflight_unreachable_ray_address_from_the_environment(work, models, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:1")
    _preflight_fails(_cfg(work, models), "(RAY_ADDRESS) is unreachable", "fix RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "head-node-without-port")
    _preflight_fails(_cfg(work, models), "is not host:port", "10.0.0.5:6379")


def test_preflight_unreachable_mlflow_hides_the_password(work, models, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@127.0.0.1:1")
    msg = _preflight_fails(_cfg(work, models), ["MLflow tracking server http://alice:***@127.0.0.1:1",
                                                "(MLFLOW_TRACKING_URI) is unreachable"], "fix MLFLOW_TRACKING_URI")
    assert SECRET not in msg


def test_preflight_sqlite_store_in_a_missing_folder(work, models):
    _preflight_fails(_cfg(work, models, f"tracking.uri=sqlite:///{work}/no/such/folder/mlflow.db"),
                     "folder", "create the folder", network=False)
    assert not (work / "no").exists()


def test_preflight_file_store_names_the_database_fix(work, models, monkeypatch):
    for uri in (f"file://{work}/mlruns", "./mlruns"):
        _preflight_fails(_cfg(work, models, f"tracking.uri={uri}"), "is a file store", "sqlite:///mlflow.db",
                         network=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's explicit opt-in is respected
    preflight.check(_cfg(work, models, f"tracking.uri=file://{work}/mlruns"), network=False)


def test_preflight_sqlite_store_that_is_not_a_database(work, models):
    (work / "mlflow.db").write_bytes(b"this is not sqlite\n" * 10)
    _preflight_fails(_cfg(work, models), "is not an SQLite database", "move that file away", network=False)


def test_preflight_storage_under_a_regular_file(work, models):
    (work / "taken").write_text("x")
    _preflight_fails(_cfg(work, models, "scaling.storage_path=taken/runs"), "is a file, not a folder",
                     "choose a folder you can write to", network=False)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_preflight_storage_where_nobody_may_write(work, models):
    _preflight_fails(_cfg(work, models, "scaling.storage_path=/sys/qlora-runs"), "is not writable",
                     "fix its permissions", network=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 500 folder anyway (the sysfs cases run)")
def test_preflight_storage_in_a_read_only_folder(work, models):
    ro = work / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _preflight_fails(_cfg(work, models, f"scaling.storage_path={ro}/runs"), "is not writable",
                         "fix its permissions", network=False)
        assert not (ro / "runs").exists()
    finally:
        ro.chmod(0o700)


# --- search spaces (ray_jobs.sweep): caught before the cluster is touched ----------------------------

SPACE_CASES = [
    ("path with a typo", {"train.learning_rat": {"loguniform": [1e-5, 1e-3]}}, {},
     "'train.learning_rat' is not a config path (did you mean 'train.learning_rate'?)", "dotted JobConfig paths"),
    ("tie to a value that is not sampled", {"train.learning_rate": {"choice": [1e-4]}},
     {"lora.alpha": {"source": "lora.r", "multiply": 2}}, "follows 'lora.r', which is not sampled",
     "add 'lora.r' to params"),
    ("value both sampled and tied", {"lora.r": {"choice": [8]}, "lora.alpha": {"choice": [16]}},
     {"lora.alpha": {"source": "lora.r", "multiply": 2}}, "'lora.alpha' is both sampled", "drop 'lora.alpha'"),
]


@pytest.mark.parametrize("params, tied, problem, fix", [c[1:] for c in SPACE_CASES], ids=[c[0] for c in SPACE_CASES])
def test_search_space_case(work, models, params, tied, problem, fix):
    cfg = job(work, model={"name": str(models["tiny"])})
    write(work, "space.yaml", yaml.safe_dump({"params": params, "tied": tied}))
    o = run_cli(["--config", cfg, "--space", "space.yaml"], entry="sweep")
    assert_bad_input(o, problem, fix, "ConfigError")


def test_sweep_whose_trial_does_not_fit_the_local_cpus(work, models, monkeypatch):
    """2 workers x 1 CPU + the trial's 0.01-CPU driver on 2 CPUs: no trial could start (Tune would wait until the
    time budget ends); refused before the cluster starts, with the cpus_per_worker that fits."""
    monkeypatch.setattr(preflight, "local_cpus", lambda: 2)
    cfg = job(work, model={"name": str(models["tiny"])}, scaling={"num_workers": 2, "cpus_per_worker": 1})
    write(work, "space.yaml", yaml.safe_dump({"params": {"train.learning_rate": {"choice": [1e-4, 1e-3]}}}))
    o = run_cli(["--config", cfg, "--space", "space.yaml"], entry="sweep")
    assert_bad_input(o, ["2 workers x 1 CPUs + 0.01 CPU for the trial's driver = 2.01 CPUs", "has 2"],
                     "set scaling.cpus_per_worker=0.99", "EnvironmentProblem")


# --- real subprocesses: started in parallel when the module starts, checked at its end ----------------
# Only the processes whose tests are selected start (`-k` on an in-process case starts none).

SUBPROCESS_TIMEOUT = 300
CLI_TESTS = {  # process name -> the test that reads its result
    "secrets": "test_secrets_in_the_environment_reach_no_output",
    "misspelt": "test_cli_misspelt_key_exits_2_with_suggestion",
    "pickle": "test_cli_pickle_only_model_is_refused_before_anything_is_created",
    "mlflow": "test_cli_unreachable_mlflow_fails_fast_without_a_store",
}


class Background:
    def __init__(self, root: Path):
        self.root, self.procs = root, {}

    def start(self, name: str, args: list[str], env: dict | None = None):
        folder = self.root / name
        folder.mkdir()
        files = (open(folder / "stdout", "w"), open(folder / "stderr", "w"))
        environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        for var in ("QLORA_HOME", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_JOB_SUBMISSION_ID"):
            environ.pop(var, None)
        # Own session: a run that must be stopped is killed with the Ray cluster it started.
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=folder, env=environ, stdout=files[0],
                                stderr=files[1], start_new_session=True)
        self.procs[name] = (proc, files, folder, time.time())

    def result(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        """Wait for `name`; returns its outcome and its working folder (empty but for stdout/stderr)."""
        proc, files, folder, started = self.procs[name]
        try:
            proc.wait(timeout=max(1.0, SUBPROCESS_TIMEOUT - (time.time() - started)))
        except subprocess.TimeoutExpired:
            self._kill(proc)
        for f in files:
            f.close()
        return subprocess.CompletedProcess(proc.args, proc.returncode, (folder / "stdout").read_text(),
                                           (folder / "stderr").read_text()), folder

    @staticmethod
    def _kill(proc):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self):
        for proc, files, *_ in self.procs.values():
            if proc.poll() is None:
                self._kill(proc)
            for f in files:
                f.close()


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory, models):
    selected = {item.originalname for item in request.session.items}
    root = tmp_path_factory.mktemp("cli")
    bg = Background(root)
    data = {"path": str(PEOPLE), "max_samples": 16, "eval_max_samples": 4, "max_length": 96}

    def config(name: str, **sections) -> str:
        cfg = {"model": {"name": str(models["tiny"])}, "data": dict(data), "evaluation": {"generate": False}}
        for key, value in sections.items():
            cfg.setdefault(key, {}).update(value)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    runs = {
        # A real short training run with credentials in the environment; everything it writes in one folder.
        "secrets": (["ray_jobs.train", "--config", config(
            "secrets", train={"max_steps": 2, "batch_size": 2, "log_every": 1},
            scaling={"num_workers": 1, "storage_path": str(root / "secrets-run" / "runs")},
            tracking={"uri": f"sqlite:///{root / 'secrets-run' / 'mlflow.db'}", "experiment": "secrets",
                      "run_name": "secrets"})],
            {"HF_TOKEN": f"hf_{SECRET}", "MLFLOW_TRACKING_PASSWORD": SECRET, "MLFLOW_TRACKING_TOKEN": SECRET,
             "AWS_SECRET_ACCESS_KEY": SECRET, "WANDB_API_KEY": SECRET}),
        "misspelt": (["ray_jobs.train", "--config", config("misspelt"), "--set", "data.max_lenght=64", "--dry-run"],
                     None),
        "pickle": (["ray_jobs.train", "--config", config("pickle", model={"name": str(models["pickle"])})], None),
        "mlflow": (["ray_jobs.train", "--config", config("mlflow"), "--set", "tracking.uri=http://127.0.0.1:1"], None),
    }
    (root / "secrets-run").mkdir()
    for name, (args, env) in runs.items():  # the longest first
        if CLI_TESTS[name] in selected:
            bg.start(name, args, env)
    yield bg
    bg.stop_all()


def _assert_cli_bad_input(done: subprocess.CompletedProcess, problem: str, fix: str) -> dict:
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["exit_code"] == 2 and problem in last["error"] and fix in last["error"].partition("fix:")[2]
    assert problem in done.stderr and "fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout  # failed before Ray
    return last


def test_cli_misspelt_key_exits_2_with_suggestion(background):
    done, cwd = background.result("misspelt")
    last = _assert_cli_bad_input(done, "unknown key 'data.max_lenght' (did you mean 'max_length'?)",
                                 "rename or remove 'data.max_lenght'")
    assert last["error_type"] == "ConfigError"
    assert _tree(cwd) == {"stdout", "stderr"}


def test_cli_pickle_only_model_is_refused_before_anything_is_created(background):
    done, cwd = background.result("pickle")
    _assert_cli_bad_input(done, "holds only pickle weights", "model.allow_pickle=true")
    assert _tree(cwd) == {"stdout", "stderr"}  # no runs/, no mlflow.db


def test_cli_unreachable_mlflow_fails_fast_without_a_store(background):
    done, cwd = background.result("mlflow")
    _assert_cli_bad_input(done, "MLflow tracking server http://127.0.0.1:1", "fix tracking.uri")
    assert "mlflow.db" not in _tree(cwd) and "mlruns" not in _tree(cwd)


def test_secrets_in_the_environment_reach_no_output(background):
    """A real short run (tiny model, 2 steps, 1 worker) with credentials in the environment: they must
    not appear in MLflow params/tags, any saved config.yaml, any file the job wrote, or its output."""
    from qlora.tracking import client
    done, _ = background.result("secrets")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    folder = background.root / "secrets-run"
    assert SECRET not in done.stdout and SECRET not in done.stderr
    c = client(f"sqlite:///{folder / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("secrets").experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.data.params["model.trust_remote_code"] == "False" and run.data.params["model.allow_pickle"] == "False"
    for k, v in {**run.data.params, **run.data.tags}.items():
        assert SECRET not in k and SECRET not in v, k
    configs = list(folder.rglob("config.yaml"))
    assert configs, "the run saved no config.yaml"
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written) and any("checkpoint_" in str(p) for p in written)
    for p in written:  # config.yaml files, checkpoints, the MLflow database and artifacts
        assert SECRET.encode() not in p.read_bytes(), p
