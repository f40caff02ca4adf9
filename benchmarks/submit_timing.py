"""`ray job submit` a training job and timestamp its streamed log: seconds from the submit command to
the job's first training step, and each step's tokens/s as the worker reported it.

    python3 benchmarks/submit_timing.py --address http://127.0.0.1:8265 -- --config CONFIG [--set k=v ...]
Prints one JSON line, with the job's throughput by the clock and each rank's peak GPU memory (its last JSON
line), the steps whose window fell under 80% of the median, and the recompiles TORCH_LOGS=recompiles logged.
Needs RAY_AUTH_MODE=token (as the cluster) and `ray` on PATH.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time

NUMBER = r"([\d.]+(?:e[+-]\d+)?)"  # the worker prints 4 significant digits: 2.568e+04
STEP = re.compile(r"\[qlora\] step (\d+)/\d+ .*?tokens/s ([\d,]+) .*?peak ([\d.]+) GiB")  # console.progress_line
RECOMPILE = "Recompiling function"  # TORCH_LOGS=recompiles in the workers' environment
CLOCK_KEYS = ("clock_tokens_per_second", "clock_tokens_per_second_after_first_step", "first_step_seconds",
              "eval_seconds", "report_seconds", "train_seconds")  # from the job's last JSON line
# Seconds from the submit command to the first line holding each text (the parts of the start).
MARKS = {"job_started": "Job '", "data_ready": "[qlora] data: ",
         "weights_loaded": "[qlora] 4-bit base", "weights_loaded_16bit": "[qlora] base loaded",
         "compile_cache_loaded": "compiled artifacts from", "lora_and_compile_set_up": "[qlora] compiling ",
         "workers_started": "[qlora] held-out evaluation before training",
         "before_eval_done": "[qlora] before training", "compile_cache_written": "MiB written to"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--log", help="also write the job's streamed log here, each line with its seconds")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE in the job's runtime environment "
                   "(its driver and workers)")
    args, job_args = p.parse_known_args()
    job_args = [a for a in job_args if a != "--"]
    env = dict(e.split("=", 1) for e in args.env)
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env})] if env else []
    cmd = ["ray", "job", "submit", "--address", args.address, *runtime_env, "--", sys.executable, "-m",
           "ray_jobs.train", *job_args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks, steps, tail, recompiles, summary = {}, {}, [], [], {}
    log = open(args.log, "w") if args.log else None
    for line in proc.stdout:
        t = round(time.time() - t0, 2)
        if log:
            log.write(f"{t:8.2f} {line}")
        tail = (tail + [line.rstrip()])[-30:]
        for name, text in MARKS.items():
            if text in line and name not in marks:
                marks[name] = t
        if m := STEP.search(line):
            steps[int(m.group(1))] = {"t": t, "tok_s": float(m.group(2).replace(",", "")), "peak_gib": float(m.group(3))}
        if RECOMPILE in line:
            recompiles.append({"after_step": max(steps, default=0), "line": line.strip()[:300]})
        if line.startswith("{") and '"clock_tokens_per_second"' in line:
            summary = json.loads(line)
    rc = proc.wait()
    timed = [s["tok_s"] for k, s in sorted(steps.items()) if k > args.warmup]
    median = statistics.median(timed) if timed else None
    clock = {k: summary.get(k) for k in CLOCK_KEYS}
    if median and clock.get("clock_tokens_per_second_after_first_step"):
        clock["clock_after_first_step_over_median"] = round(clock["clock_tokens_per_second_after_first_step"] / median, 4)
    print(json.dumps({"rc": rc, "submit_to_first_step_s": steps[min(steps)]["t"] if steps else None, **marks,
                      "steps": len(steps), "median_tok_s": median, **clock,
                      # windows under 80% of the median (a 1-step window with log_every=1): where time went
                      "slow_steps": {k: s["tok_s"] for k, s in sorted(steps.items())
                                     if k > 1 and median and s["tok_s"] < 0.8 * median},
                      "recompiles": recompiles,
                      "peak_gib": max((s["peak_gib"] for s in steps.values()), default=None),
                      "peak_gib_by_rank": summary.get("peak_memory_gib_by_rank"),
                      "wall_s": round(time.time() - t0, 1), "tail": tail if rc else None}), flush=True)


if __name__ == "__main__":
    main()
