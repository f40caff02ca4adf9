"""Every interrupted run ends where the uninterrupted one does: 2 Ray Train workers over gloo, a 4-bit (NF4) base
with LoRA, one uninterrupted DDP run as the reference.

- scaling.strategy=fsdp (FSDP2 shards every layer), one worker sent SIGTERM mid-run (a preemption notice): every
  rank finishes its step, the step's checkpoint is written and registered, the workers stop, Ray Train restarts
  the group, and the run resumes at exactly that step; it ends at DDP's adapter, each worker holding half the
  frozen weights, with whole adapter checkpoints (every LoRA tensor at full shape, loadable by plain peft) and
  held-out sets of odd size split unevenly over the ranks (collective forwards in lockstep).
- scaling.strategy=deepspeed (ZeRO-2 partitions the optimizer state), one worker killed: resumes from the
  partitioned state, with a checkpoint in DDP's format.
- On two nodes, one drained by Ray as a spot reclaim would be: the run checkpoints on the notice, goes on on the
  one worker left (accumulating 4 micro-batches per step instead of 2: the same global batch), is stopped with
  Ctrl+C, has its newest checkpoint corrupted, and is finished on 2 workers from the one before, in one MLflow run;
  the same run name with another learning rate is refused.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, write_tiny_llama
from jobs import (drain_as_preempted, kill_job, local_nodes, registered_checkpoints, resumed_steps, train_worker_pids,
                  wait_for)

NUM_GENERATE = 5  # odd: one rank generates for 3 prompts, the other for 2 plus a discarded repeat


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, smollm_dir) -> Path:
    """The tiny Llama with its own output head (as Llama-3-8B/70B have), so FSDP gets separate embedding and
    head units besides the decoder layers."""
    return write_tiny_llama(tmp_path_factory.mktemp("untied-llama"), smollm_dir, tie_word_embeddings=False)


def job_cmd(folder: Path, model: Path, name: str, strategy: str, max_failures: int = 0) -> list[str]:
    cfg = {"model": {"name": str(model)},
           "data": {"path": str(ROOT / "data" / "people_json.jsonl"), "max_samples": 96, "eval_max_samples": 7,
                    "max_length": 128},
           # Two micro-batches per step: the gradient sync is skipped on the first (DDP no_sync, FSDP
           # set_requires_gradient_sync), and both must still train alike.
           "train": {"max_steps": 12, "batch_size": 4, "gradient_accumulation": 2, "learning_rate": 5e-3,
                     "log_every": 4, "save_every": 4, "seed": 7},
           "evaluation": {"generate": True, "num_generate": NUM_GENERATE, "max_new_tokens": 8},
           "scaling": {"num_workers": 2, "strategy": strategy, "storage_path": str(folder / "runs"),
                       "max_failures": max_failures},
           "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": name, "run_name": name}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "ray_jobs.train", "--config", str(path)]


def run_job(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def adapter(result: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result["adapter"]) / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, untied_model_dir) -> dict:
    """The uninterrupted DDP run every other run must reproduce."""
    folder = tmp_path_factory.mktemp("ddp-run")
    return run_job(job_cmd(folder, untied_model_dir, "ddp", "ddp"))


def interrupted(tmp_path: Path, model: Path, strategy: str, how: str) -> tuple[dict, str]:
    """The reference job under `strategy`, one of its 2 workers sent SIGTERM (how="notice") or SIGKILL
    (how="kill", max_failures=1) after the first registered checkpoint: (the final result, the log)."""
    cmd = job_cmd(tmp_path, model, "interrupted", strategy, max_failures=1)
    log_path = tmp_path / "interrupted.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: registered_checkpoints(tmp_path / "runs" / "interrupted"), proc, "a checkpoint")
        victims = train_worker_pids(proc)
        assert len(victims) == 2
        psutil.Process(victims[1]).send_signal(signal.SIGTERM if how == "notice" else signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    log = log_path.read_text()
    return json.loads(log.strip().splitlines()[-1]), log


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, untied_model_dir) -> tuple[dict, str]:
    """The job under FSDP, one worker sent a preemption notice (SIGTERM) after its first checkpoint."""
    return interrupted(tmp_path_factory.mktemp("fsdp-run"), untied_model_dir, "fsdp", "notice")


def test_fsdp_preempted_by_sigterm_resumes_at_the_notice_step_and_trains_as_ddp_does(ddp, fsdp):
    """SIGTERM to one worker: the step it was in is finished and checkpointed, the run resumes there (not at the
    last periodic checkpoint), counted as a preemption, and ends where uninterrupted DDP does."""
    result, log = fsdp
    notice_steps = [int(line.split("checkpoint at step ")[1].split()[0]) for line in log.splitlines()
                    if "preemption notice: checkpoint at step" in line]
    assert len(notice_steps) == 1 and 4 < notice_steps[0] < 12, log[-3000:]
    assert resumed_steps(log) == notice_steps  # exactly the notice step
    assert result["preemptions"] == 1 and result["restarts"] == 0
    assert result["steps"] == ddp["steps"] == 12
    a, b = adapter(ddp), adapter(result)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    for key in ("eval_loss", "exact_match"):
        assert result["metrics_after"][key] == pytest.approx(ddp["metrics_after"][key], rel=1e-4)
    assert result["metrics_after"]["eval_loss"] < result["metrics_before"]["eval_loss"] - 0.1  # it learned
    # Frozen base bytes per worker: FSDP holds one of two shards (up to the padding of odd-sized tensors).
    assert result["weights_memory_gib"] == pytest.approx(ddp["weights_memory_gib"] / 2, rel=0.02)
    for r in (ddp, result):  # every generated prediction once, none of the lockstep repeats
        lines = (Path(r["checkpoint"]) / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == NUM_GENERATE


def test_fsdp_adapter_checkpoint_is_whole_and_loads_in_one_process(fsdp, untied_model_dir):
    """Gathered from both shards before rank 0 writes (an adapter saved from one shard is empty or half:
    TRL #4416). Plain peft on a plain base loads it with nothing missing, and every LoRA B matrix, zero at
    initialisation, has been trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    result, _ = fsdp
    weights = adapter(result)
    base = AutoModelForCausalLM.from_pretrained(untied_model_dir)
    model = PeftModel.from_pretrained(base, result["adapter"])
    expected = {n: p.shape for n, p in model.named_parameters() if "lora_" in n}
    assert len(weights) == len(expected) == 2 * 7 * 2  # A and B, 7 linear layers, 2 decoder layers
    for name, tensor in weights.items():
        loaded = name.replace(".weight", ".default.weight")
        assert tensor.shape == expected[loaded], name
        if "lora_B" in name:
            assert tensor.abs().sum() > 0, f"{name} is still zero"
    # The trainer state holds the whole optimizer state too: AdamW's moments at each LoRA tensor's full shape.
    state = torch.load(Path(result["checkpoint"]) / "trainer_state.pt", weights_only=False)
    moments = state["optimizer"]["state"]
    assert {k.replace(".default", "") for k in moments} == weights.keys()
    for key, moment in moments.items():
        assert moment["exp_avg"].shape == moment["exp_avg_sq"].shape == weights[key.replace(".default", "")].shape


def test_deepspeed_zero2_resumes_a_killed_worker_to_ddps_result(tmp_path, ddp, untied_model_dir):
    """ZeRO-2 partitions the AdamW moments over the 2 workers; checkpoints hold them whole (DeepSpeed's
    tensor-fragment API), in torch's format as DDP writes it, and a restarted group splits them again. The
    resumed run ends where uninterrupted DDP does: same data, same steps, same update."""
    result, log = interrupted(tmp_path, untied_model_dir, "deepspeed", "kill")
    assert resumed_steps(log) and resumed_steps(log)[0] in (4, 8)
    assert result["steps"] == 12 and result["restarts"] == 1 and result["preemptions"] == 0
    a, b = adapter(ddp), adapter(result)
    assert a.keys() == b.keys()
    for k in a:
        # Measured: 3.6e-6 at most (1 of 2,048 elements of one tensor): AdamW's m / sqrt(v) turns the rounding
        # of a near-zero gradient into a step-sized difference. A step replayed or skipped at the resume moves
        # elements by about the learning rate (5e-3), 500 times this tolerance.
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert result["metrics_after"]["eval_loss"] == pytest.approx(ddp["metrics_after"]["eval_loss"], rel=1e-4)
    ours, ddps = (torch.load(Path(r["checkpoint"]) / "trainer_state.pt", weights_only=False)["optimizer"]
                  for r in (result, ddp))
    assert ours["state"].keys() == ddps["state"].keys() and len(ours["state"]) == 2 * 7 * 2
    for i, moments in ddps["state"].items():
        assert ours["state"][i]["step"] == moments["step"] == 12
        for key in ("exp_avg", "exp_avg_sq"):
            # ZeRO-2 reduces gradients in another order than DDP, and 12 steps amplify the rounding: the
            # moments differ by up to 1.3e-5 of a tensor's largest element here and 0.43% at one element on the
            # CI machine (an exp_avg_sq of 3.8e-7). A resumed run matches an uninterrupted DeepSpeed run bit for
            # bit (measured); a lost, zeroed or misplaced partition, or moments restarted at the resume, are off
            # by tens of percent (0.9^4 of exp_avg's weight), far outside these bounds.
            scale = float(moments[key].abs().max())
            torch.testing.assert_close(ours["state"][i][key], moments[key], rtol=1e-2, atol=1e-3 * scale)


@pytest.fixture
def two_nodes():
    """A Ray cluster of two nodes on this machine (two raylets, one CPU each), which jobs join by address."""
    cluster, (second,) = local_nodes(1, 1)
    yield cluster, second
    cluster.shutdown()


def test_a_run_that_loses_a_node_then_its_driver_and_a_checkpoint_ends_at_the_uninterrupted_adapter(
        tmp_path, ddp, untied_model_dir, two_nodes):
    """One run through everything a spot cluster does to it, ending at uninterrupted DDP's adapter:
    1. On two nodes (one worker each, scaling.min_workers=1), Ray drains the second node as a spot reclaim would
       (`ray drain-node`, reason preemption): Ray Train's preemption watcher marks the workers, the step in progress
       is checkpointed, and the run resumes at that step on the one worker left (elastic), which runs 4 micro-batches
       per step instead of 2: the same global batch, the same examples and dropout seeds.
    2. Stopped there with Ctrl+C: exit 130, its MLflow run KILLED, the command that resumes it named.
    3. Its newest checkpoint corrupted, the same command on a local cluster of 2 CPUs skips it, resumes from the
       notice checkpoint on 2 workers, finishes in the same MLflow run.
    4. The same run name with another learning rate is refused before Ray starts (it would return this adapter)."""
    from qlora.tracking import client
    cluster, second = two_nodes
    cmd = job_cmd(tmp_path, untied_model_dir, "elastic", "ddp", max_failures=1) + ["--set", "scaling.min_workers=1"]
    run_dir, log_path = tmp_path / "runs" / "elastic", tmp_path / "two-nodes.log"
    proc = subprocess.Popen(cmd + ["--set", f"scaling.ray_address={cluster.address}"], cwd=ROOT,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.2"})  # Ray's default: 5 s
    try:
        wait_for(lambda: registered_checkpoints(run_dir), proc, "a checkpoint")
        drain_as_preempted(cluster, second)
        one_worker = "worker, 4 micro-batch(es) each per step"
        wait_for(lambda: one_worker in log_path.read_text()
                 and max([s for s, _ in registered_checkpoints(run_dir)], default=0) >= 8,
                 proc, "a checkpoint on the one worker left")
        proc.send_signal(signal.SIGINT)  # Ctrl+C
        assert proc.wait(timeout=120) == 130
    finally:
        kill_job(proc)
    cluster.shutdown()
    log = log_path.read_text()
    notice = [int(line.split("checkpoint at step ")[1].split()[0]) for line in log.splitlines()
              if "preemption notice: checkpoint at step" in line]
    assert len(notice) == 1 and 4 < notice[0] < 8, log[-4000:]
    assert f"resumed from checkpoint at step {notice[0]} (written on a preemption notice) on 1 {one_worker}" in log
    stopped = json.loads(log.strip().splitlines()[-1])
    assert stopped["error_type"] == "Interrupted" and "--set tracking.run_name=elastic" in stopped["error"]
    mlflow = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("elastic").experiment_id
    assert [r.info.status for r in mlflow.search_runs([experiment])] == ["KILLED"]

    (older, _), (newest_step, newest) = registered_checkpoints(run_dir)
    assert older == notice[0] and newest_step >= 8
    weights = newest / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash mid-copy
    local = cmd + ["--set", "scaling.ray_address=local"]  # a fresh local cluster of this machine's 2 CPUs
    again = subprocess.run(local, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert f"skipping corrupt checkpoint: {newest}" in out and "resuming from the previous intact checkpoint" in out
    assert resumed_steps(out) == notice and "on 2 workers, 2 micro-batch(es) each per step" in out
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["steps"] == 12 and result["preemptions"] == 1 and result["restarts"] == 0
    a, b = adapter(ddp), adapter(result)
    for k in a:
        # 1 worker sums 4 micro-batches' gradients where 2 sum 2 each and all-reduce: the same terms, summed in
        # another order (a different example set or dropout mask at any step moves elements by ~1e-3).
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert result["metrics_after"]["eval_loss"] == pytest.approx(ddp["metrics_after"]["eval_loss"], rel=1e-5)
    runs = mlflow.search_runs([experiment])  # one run across both commands, its loss history continued
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
    assert max(m.step for m in mlflow.get_metric_history(result["mlflow_run_id"], "loss")) == 12

    changed = subprocess.run(local + ["--set", "train.learning_rate=1e-4", "--set", "train.log_every=1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2, changed.stdout[-2000:] + changed.stderr[-2000:]
    error = json.loads(changed.stdout.strip().splitlines()[-1])["error"]
    assert "run elastic has checkpoints" in error and "train.learning_rate: 0.005 in the run, 0.0001 now" in error
    assert "log_every" not in error and "fix: set tracking.run_name to a new name" in error
    assert "resuming" not in changed.stdout and "Started a local Ray instance" not in changed.stderr


@pytest.fixture
def one_rank_group():
    """A one-rank process group over gloo, for the in-process tests of FSDP units and the DeepSpeed engine."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 900))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_state_after_an_evaluation_keys_every_trainable_parameter(tiny_model_dir, one_rank_group):
    """A classifier's head is trainable and lives in FSDP's root unit, which keeps its gathered parameters
    after a no-grad forward: gathering adapter and optimizer state right after an evaluation must still find
    the head (it raised KeyError before `strategies.fsdp.resharded`). One process, a one-rank mesh over gloo."""
    from qlora import distributed, modeling
    from qlora.config import JobConfig
    from qlora.model_source import ModelSource
    from qlora.strategies import FSDP
    cfg = JobConfig.model_validate({"model": {"name": str(tiny_model_dir), "task": "sequence_classification",
                                              "num_labels": 2},
                                    "data": {"path": "x.tsv", "format": "classification"},
                                    "scaling": {"strategy": "fsdp"}})
    base = modeling.load_base_model(cfg, ModelSource(str(tiny_model_dir), True, "tiny"), torch.device("cpu"), 0,
                                    prepare=FSDP.prepare_base)
    model = modeling.attach_lora(base, cfg.lora, "sequence_classification")
    fsdp = FSDP(distributed.Context(0, 1, torch.device("cpu"), sharded=True), cfg)
    _, optimizer = fsdp.wrap(model, torch.optim.AdamW)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # evaluation
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert sorted(fsdp.optimizer_state(model, optimizer)["state"]) == sorted(trainable)
    assert sorted(fsdp.trainable_state(model)) == sorted(trainable)


def test_fused_loss_under_fsdp_gives_the_plain_gradients(tmp_path, one_rank_group):
    """train.fused_cross_entropy multiplies by the head's weight after the forward pass; under FSDP the head
    stays in the root unit, which keeps it gathered through the backward pass. One process, a one-rank mesh
    over gloo, an untied 4-bit Llama: the loss and every LoRA gradient equal those without FSDP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora import distributed, kernels, modeling
    from qlora.config import JobConfig
    from qlora.model_source import ModelSource
    from qlora.strategies import FSDP
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
                     ).save_pretrained(tmp_path / "untied")
    cfg = JobConfig.model_validate({"model": {"name": str(tmp_path / "untied")}, "data": {"path": "x.jsonl"},
                                    "lora": {"dropout": 0.0}, "train": {"fused_cross_entropy": True},
                                    "scaling": {"strategy": "fsdp"}})
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for sharded in (False, True):
        base = modeling.load_base_model(cfg, ModelSource(str(tmp_path / "untied"), True, "untied"),
                                        torch.device("cpu"), prepare=FSDP.prepare_base)
        torch.manual_seed(0)
        model = modeling.attach_lora(base, cfg.lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the A matrices a gradient too
                p.data.normal_(0, 0.05)
        hidden = kernels.HiddenStates(model)
        ctx = distributed.Context(0, 1, torch.device("cpu"), sharded=sharded)
        wrapped = FSDP(ctx, cfg).wrap(model, torch.optim.AdamW)[0] if sharded else model
        loss, n = kernels.forward_loss(wrapped, {"input_ids": ids}, ids, hidden)
        (loss / n).backward()
        results.append((loss.item(), {k: distributed.full(p.grad) for k, p in model.named_parameters()
                                      if p.grad is not None}))
    (plain_loss, plain_grads), (fsdp_loss, fsdp_grads) = results
    assert fsdp_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == fsdp_grads.keys() and len(plain_grads) == 2 * 7 * 2
    for k in plain_grads:
        torch.testing.assert_close(fsdp_grads[k], plain_grads[k], rtol=1e-4, atol=1e-7, msg=k)


def test_deepspeed_engine_runs_the_forward_under_the_steps_autocast(one_rank_group):
    """On CUDA, DeepSpeed's engine turns an outer torch.autocast off inside its forward unless its own config
    asks for autocast (measured on 2 H200s: the 8B step ran in fp32, 0.57x DDP's speed). with_deepspeed puts
    the step's autocast dtype into that config, so the engine casts by itself: here, with no outer autocast,
    the decoder's linear layers compute in bf16 when it is passed and in fp32 when not. One process, a
    one-rank group over gloo, CPU autocast standing in for the GPU's (DeepSpeed only ever disables CUDA's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora import distributed
    from qlora.config import JobConfig
    from qlora.strategies import DeepSpeed
    cfg = JobConfig.model_validate({"model": {"name": "unused"}, "data": {"path": "unused.jsonl"},
                                    "train": {"batch_size": 2}, "scaling": {"strategy": "deepspeed"}})
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    seen = {}
    for dtype in (None, torch.bfloat16):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        q_proj = model.model.layers[0].self_attn.q_proj
        q_proj.register_forward_hook(lambda m, i, out, key=dtype: seen.__setitem__(key, out.dtype))
        engine, _ = DeepSpeed(distributed.Context(0, 1, torch.device("cpu")), cfg).wrap(
            model, torch.optim.AdamW, autocast_dtype=dtype)
        assert engine is not model and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
        engine(input_ids=ids)
    assert seen == {None: torch.float32, torch.bfloat16: torch.bfloat16}
