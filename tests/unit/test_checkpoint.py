"""Checkpoint folders: atomic write, manifest check, corruption detection."""

from pathlib import Path

import pytest
import torch

from qlora import checkpoint, modeling
from qlora.config import JobConfig
from qlora.model_source import ModelSource


@pytest.fixture
def lora_model(tiny_model_dir):
    cfg = JobConfig.model_validate({"model": {"name": str(tiny_model_dir)}, "data": {"path": "x"},
                                    "quantization": {"bits": 16}})
    base = modeling.load_base_model(cfg, ModelSource(str(tiny_model_dir), True, "tiny"), torch.device("cpu"))
    return cfg, modeling.attach_lora(base, cfg.lora)


def test_save_verify_and_detect_corruption(tmp_path, lora_model):
    cfg, model = lora_model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    folder = checkpoint.save(tmp_path / "ckpt", model, cfg, opt.state_dict(), None, {"step": 3})
    assert not (tmp_path / "ckpt.tmp").exists()
    checkpoint.verify(folder)
    assert checkpoint.load_trainer_state(folder)["state"]["step"] == 3
    weights = folder / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated, as after a crash mid-copy
    with pytest.raises(checkpoint.CorruptCheckpoint, match="adapter_model.safetensors"):
        checkpoint.verify(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(checkpoint.CorruptCheckpoint, match="manifest"):
        checkpoint.verify(folder)


def test_a_failed_checkpoint_upload_is_retried_and_registers_nothing_half_written(tmp_path, capsys):
    """Ray Train's own upload into a real local storage whose destination is unusable for a moment (a file where
    the checkpoint's folder goes): the first attempt fails, the retry after the storage recovers copies every file."""
    import threading

    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from qlora.checkpoint import upload_with_retries
    local = tmp_path / "local"
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (local / "manifest.json").write_text("{}")
    storage = StorageContext(str(tmp_path / "storage"), "run")
    blocked = tmp_path / "storage" / "run" / "checkpoint_1"
    blocked.parent.mkdir(parents=True, exist_ok=True)  # StorageContext may have made it
    blocked.write_text("not a folder")  # the storage refuses the upload until this is gone
    threading.Timer(0.5, blocked.unlink).start()
    persisted = upload_with_retries(storage, Checkpoint.from_directory(str(local)), "checkpoint_1", delays=(1.0,))
    assert Path(persisted.path) == blocked
    assert "checkpoint upload checkpoint_1 failed (attempt 1" in capsys.readouterr().err  # refused, then retried
    assert (blocked / "adapter" / "adapter_model.safetensors").read_bytes() == b"w" * 1000
    blocked_again = blocked.with_name("checkpoint_2")
    blocked_again.write_text("still not a folder")
    with pytest.raises(OSError):  # out of attempts: the error reaches Ray Train, which registers nothing
        upload_with_retries(storage, Checkpoint.from_directory(str(local)), "checkpoint_2", delays=(0.1,))
