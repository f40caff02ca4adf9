"""Every source data.path takes gives the examples of the same records as a local file: a folder of shards, a
save_to_disk folder, parquet, a hub dataset id (through a local datasets cache built here, read offline), and
s3:// on a real S3-compatible server (moto's, on loopback), in this process and through Ray Data. Bad sources
and half-written caches are refused or redone."""
import json
import shutil
from pathlib import Path

import pytest

from qlora.config import DataSection
from qlora.data import cache, pipeline, prepare_in_memory
from qlora.errors import DataError

from conftest import ROOT
from servers import start_s3_server

PEOPLE = ROOT / "data" / "people_json.jsonl"
SETTINGS = {"format": "alpaca", "max_samples": 64, "eval_max_samples": 8, "max_length": 128}


def items(data) -> list:
    return [(e["input_ids"], e["labels"]) for e in data.train] + [(e["input_ids"], e["reference"]) for e in data.eval]


@pytest.fixture(scope="module")
def reference(smollm_tokenizer):
    return items(prepare_in_memory(DataSection(path=str(PEOPLE), **SETTINGS), smollm_tokenizer))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    client = server.client()
    client.create_bucket(Bucket="data")
    client.upload_file(str(PEOPLE), "data", "people.jsonl")
    lines = PEOPLE.read_text().splitlines(keepends=True)
    for i in range(2):
        client.put_object(Bucket="data", Key=f"shards/part-{i}.jsonl", Body="".join(lines[i * 400:(i + 1) * 400]))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_ray(s3):
    """A local Ray cluster whose workers have the S3 server's settings in their environment, as a cluster's
    nodes have their cloud credentials."""
    import ray
    ray.shutdown()  # the test process's shared cluster (conftest.ray_cluster), if it runs, steps aside
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": s3.env()})
    yield
    ray.shutdown()


def prepared(path: str, tokenizer, storage: Path, executor: str = "in_process", **extra):
    cfg = DataSection(path=path, **{**SETTINGS, "pipeline": executor, **extra})
    return pipeline.prepare(pipeline.plan(cfg, tokenizer, str(storage)))


def write_shards(folder: Path, n: int = 3) -> Path:
    lines = PEOPLE.read_text().splitlines(keepends=True)
    folder.mkdir(parents=True)
    size = -(-len(lines) // n)
    for i in range(n):
        (folder / f"part-{i}.jsonl").write_text("".join(lines[i * size:(i + 1) * size]))
    return folder


def test_folder_of_shards_save_to_disk_and_parquet_read_as_the_file(smollm_tokenizer, tmp_path, reference):
    import datasets
    ds = datasets.load_dataset("json", data_files=str(PEOPLE), split="train")
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "people.parquet"))
    for path in (write_shards(tmp_path / "shards"), tmp_path / "saved", tmp_path / "people.parquet"):
        assert items(prepared(str(path), smollm_tokenizer, tmp_path / "runs")) == reference, path


def build_hub_cache(root: Path, repo_id: str, data_file: Path) -> None:
    """What `datasets` leaves in its cache after downloading a JSON dataset from the hub (its packaged json
    builder, prepared into the cache folder the hub id maps to), built here because the hub is unreachable."""
    from datasets.packaged_modules.json.json import Json
    builder = Json(cache_dir=str(root / "build"), dataset_name=repo_id.split("/")[1], config_name="default",
                   data_files={"train": str(data_file)})
    builder.download_and_prepare()
    target = root / repo_id.replace("/", "___") / "default" / "0.0.0" / "local"
    shutil.copytree(builder.cache_dir, target)


def test_hub_dataset_id_from_the_local_datasets_cache(smollm_tokenizer, tmp_path, reference, monkeypatch, local_ray):
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    build_hub_cache(tmp_path / "hf", "qlora-test/people", PEOPLE)
    assert items(prepared("qlora-test/people", smollm_tokenizer, tmp_path / "runs")) == reference
    assert items(prepared("qlora-test/people", smollm_tokenizer, tmp_path / "runs2", "ray_data")) == reference
    with pytest.raises(DataError, match=r"(?s)hub dataset qlora-test/people \(split test\).*Unknown split.*set data.split"):
        prepared("qlora-test/people", smollm_tokenizer, tmp_path / "runs", split="test")
    with pytest.raises(DataError, match=r"(?s)qlora-test/absent.*could not be loaded.*load it once where the hub"):
        prepared("qlora-test/absent", smollm_tokenizer, tmp_path / "runs")


def test_s3_file_and_prefix_read_as_the_local_file(smollm_tokenizer, tmp_path, reference, s3, monkeypatch, local_ray):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    for executor in ("in_process", "ray_data"):
        for uri in ("s3://data/people.jsonl", "s3://data/shards"):
            assert items(prepared(uri, smollm_tokenizer, tmp_path / executor, executor)) == reference, (uri, executor)
    # The cache itself in cloud storage: written there, read back through a node-local copy.
    monkeypatch.setenv("QLORA_DATA_CACHE", str(tmp_path / "node-cache"))
    first = prepared(str(PEOPLE), smollm_tokenizer, "s3://data/runs")
    again = prepared(str(PEOPLE), smollm_tokenizer, "s3://data/runs")
    assert not first.reused and again.reused and items(again) == reference
    for uri, problem in (("s3://data/nothing.jsonl", "does not exist"), ("s3://absent-bucket/people.jsonl", "")):
        with pytest.raises(DataError, match=f"(?s)data.path.*{problem}.*fix"):
            prepared(uri, smollm_tokenizer, tmp_path / "runs")


def test_s3_with_wrong_credentials_names_them(smollm_tokenizer, tmp_path, monkeypatch):
    """A server that checks credentials (moto's IAM): unknown keys are refused, the message says what to set."""
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    server = start_s3_server(tmp_path / "s3auth")
    try:
        for k, v in server.env(key="AKIAWRONG", secret="wrong").items():
            monkeypatch.setenv(k, v)
        with pytest.raises(DataError, match=r"(?s)cannot read s3://data/people.jsonl.*AWS_ACCESS_KEY_ID"):
            prepared("s3://data/people.jsonl", smollm_tokenizer, tmp_path / "runs")
    finally:
        server.stop()


def test_half_written_or_damaged_caches_are_never_read(smollm_tokenizer, tmp_path, reference):
    first = prepared(str(PEOPLE), smollm_tokenizer, tmp_path)
    folder = Path(first.cache)
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = folder / next(name for name in manifest["files"] if name.startswith("train/"))
    shard.write_bytes(shard.read_bytes()[:100])  # a shard cut short
    assert cache.read_manifest(str(folder)) is None
    again = prepared(str(PEOPLE), smollm_tokenizer, tmp_path)
    assert not again.reused and items(again) == reference
    (folder / "manifest.json").unlink()  # the manifest is the commit: without it, nothing is read
    assert not prepared(str(PEOPLE), smollm_tokenizer, tmp_path).reused


def test_bad_shards_name_the_file_and_record_and_leave_no_cache(smollm_tokenizer, tmp_path, local_ray):
    shards = write_shards(tmp_path / "shards")
    (shards / "part-1.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    for executor in ("in_process", "ray_data"):
        with pytest.raises(DataError, match=r"(?s)record \d+: 'output' is null or missing.*every alpaca record"):
            prepared(str(shards), smollm_tokenizer, tmp_path / executor, executor)
        assert not (tmp_path / executor).exists()  # nothing half-written left where a cache would be
    (shards / "part-2.jsonl").write_text('{"instruction": "a", "output": \n')  # a damaged shard
    with pytest.raises(DataError, match="could not be parsed as json"):
        prepared(str(shards), smollm_tokenizer, tmp_path / "runs")
    with pytest.raises(DataError, match=r"(?s)data.path: reading .*shards failed.*fix or remove the damaged file"):
        prepared(str(shards), smollm_tokenizer, tmp_path / "runs", "ray_data")
    with pytest.raises(DataError, match=r"(?s)holds files of several kinds"):
        (shards / "extra.csv").write_text("a,b\n1,2\n")
        prepared(str(shards), smollm_tokenizer, tmp_path / "runs")


def test_the_key_follows_the_tokenizer_the_settings_and_the_bytes(smollm_tokenizer, tmp_path):
    from transformers import GPT2TokenizerFast

    from conftest import SHARED
    base = DataSection(path=str(PEOPLE), **SETTINGS)
    key = pipeline.plan(base, smollm_tokenizer, str(tmp_path)).key
    assert pipeline.plan(base.model_copy(update={"pipeline": "ray_data"}), smollm_tokenizer, str(tmp_path)).key == key
    assert pipeline.plan(base.model_copy(update={"max_length": 64}), smollm_tokenizer, str(tmp_path)).key != key
    gpt2 = GPT2TokenizerFast.from_pretrained(SHARED / "tokenizers" / "gpt2")
    assert pipeline.plan(base, gpt2, str(tmp_path)).key != key
    copy = tmp_path / "copy.jsonl"
    shutil.copy(PEOPLE, copy)  # same bytes elsewhere: the same key (content-addressed)
    assert pipeline.plan(base.model_copy(update={"path": str(copy)}), smollm_tokenizer, str(tmp_path)).key == key
    copy.write_text(PEOPLE.read_text().replace("Osaka", "Kyoto"))
    assert pipeline.plan(base.model_copy(update={"path": str(copy)}), smollm_tokenizer, str(tmp_path)).key != key
