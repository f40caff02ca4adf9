"""Shared fixtures: real tokenizers from ../shared/data, the real SmolLM2 (converted once), tiny random
models for mechanics."""
import os
import re
import shlex
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _session_cache() -> None:
    """QLORA_CACHE for this test session: its own folder, so the quantized weights of the session's temporary
    models never land in the user's cache, with the user's GGUF conversions linked in (converting the packaged
    SmolLM2 again would cost a minute per session). Jobs the tests start inherit it."""
    import atexit
    import shutil
    import tempfile
    user = Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora"))
    session = Path(tempfile.mkdtemp(prefix="qlora-test-cache-"))
    (user / "gguf").mkdir(parents=True, exist_ok=True)
    (session / "gguf").symlink_to(user / "gguf")
    os.environ["QLORA_CACHE"] = str(session)
    atexit.register(shutil.rmtree, session, True)


_session_cache()
# Real tokenizers and datasets (CI checks out ../shared beside the project); tests only, never the project.
SHARED = Path(os.environ.get("QLORA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(items):
    """Tests under tests/e2e/ are marked e2e (jobs on a real Ray cluster, servers): `pytest -m "not e2e"` is the
    quick inner loop over tests/unit/."""
    for item in items:
        if "e2e" in Path(str(item.fspath)).relative_to(ROOT).parts:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF, converted to safetensors (cached across runs)."""
    from qlora.model_source import resolve
    return Path(resolve("smollm2-135m").path)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm_dir)


def write_tiny_llama(out: Path, tokenizer_dir: Path, tie_word_embeddings: bool = True) -> Path:
    """A 2-layer random Llama (seed 0) with the tokenizer of `tokenizer_dir`, saved to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=tie_word_embeddings)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer: real text pipeline, trains in seconds."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm_dir)


@pytest.fixture(scope="session")
def _local_ray_session():
    """Shuts down, at the end of this test process, the local Ray cluster `ray_cluster` keeps."""
    yield
    import ray
    ray.shutdown()


@pytest.fixture
def ray_cluster(_local_ray_session):
    """A local Ray cluster of 2 CPUs in this test process, started once and shared by the in-process jobs of every
    module this process runs (a start costs ~6 s of 2 cores). A module that needs a cluster of its own (another
    runtime environment) shuts this one down first; the next test that asks for it starts it again."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture
def people_data() -> Path:
    return ROOT / "data" / "people_json.jsonl"


def documented_commands(markdown: str) -> list[list[str]]:
    """The `python -m ray_jobs.<job> ...` commands of the ```bash blocks in `markdown`, continuation lines joined
    and comments cut, each as its arguments from `-m` on (a command after `&&` or `--` counts from `python`)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            at = line.find("python -m ray_jobs.")
            if at >= 0:
                found.append(shlex.split(line[at:], comments=True)[1:])
    return found
