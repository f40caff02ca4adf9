"""The peer for preference tuning: TRL's DPOTrainer on a bitsandbytes NF4 base with a peft LoRA, one GPU, the
settings of configs/dpo_llama3_8b_ultrafeedback.yaml (LoRA r=128 alpha 128 dropout 0.05 all linear layers,
beta 0.01, 4 pairs x 4 accumulated micro-batches (--batch-size, --accumulation), max_length 1024, gradient
checkpointing, bf16), on the same pairs file our job trains on. Prints one JSON line: pairs/s and tokens/s over
the steps after the warm-up (tokens: every non-pad token of the chosen and rejected rows TRL's collator built,
give or take the one micro-batch its loader fetches ahead), peak GPU memory.

    python3 benchmarks/trl_dpo_peer.py --model /tmp/rand-llama-8b-nf4 --data /tmp/pairs.jsonl --steps 20
"""
import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a pre-quantized NF4 checkpoint (make_random_nf4.py)")
    p.add_argument("--data", required=True, help="JSON lines with prompt / chosen / rejected strings")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--r", type=int, default=128)
    a = p.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl

    rows = [json.loads(line) for line in open(a.data)]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa")  # its config carries the NF4 settings
    load_s = time.time() - t
    args = trl.DPOConfig(output_dir="/tmp/trl-dpo", per_device_train_batch_size=a.batch_size,
                         gradient_accumulation_steps=a.accumulation, max_steps=a.steps, learning_rate=5e-6,
                         lr_scheduler_type="cosine", warmup_steps=2, beta=0.01, max_length=a.max_length,
                         gradient_checkpointing=True, bf16=True, logging_steps=1, report_to=[],
                         save_strategy="no", remove_unused_columns=False)
    lora = LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora)
    tokens, ends = [], []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer.add_callback(StepClock())
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    trainer.train()
    per_step = [sum(tokens[i * a.accumulation:(i + 1) * a.accumulation]) for i in range(len(ends))]
    seconds = [b - e for b, e in zip(ends[1:], ends)]  # step i + 1's time
    measured = list(zip(per_step[1:], seconds))[a.warmup:]
    pairs_per_step = a.batch_size * a.accumulation
    print(json.dumps({
        "peer": f"trl {trl.__version__} DPOTrainer", "steps": len(ends), "load_s": round(load_s, 1),
        "train_s": round(time.perf_counter() - t, 1),
        "tokens_per_s": round(sum(n for n, _ in measured) / sum(s for _, s in measured)),
        "pairs_per_s": round(pairs_per_step * len(measured) / sum(s for _, s in measured), 2),
        "median_step_s": round(statistics.median(s for _, s in measured), 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None}))


if __name__ == "__main__":
    main()
