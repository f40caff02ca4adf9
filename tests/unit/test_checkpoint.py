"""Checkpoint folders: atomic write, manifest check, corruption detection."""

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
