"""The trainer end to end against the step benchmark: is what is benchmarked what trains?

For one variant (default `e`), in one run: the step benchmark's samples/s (`bench_step.py`'s
measurement, in this process), then `python -m soar_fast.train --config <the same TrainConfig>`
on synthetic latents of the same shape (a subprocess: exactly what a user runs, data loading,
logging syncs and all; no checkpoint or export written) and its logged `perf/samples_per_s`
after the warm-up window. The goal row `trainer_vs_bench` is their ratio (goal >= 0.95).

  python benchmarks/bench_train.py --variant e --steps 20 --out train_e.json     # GPU, SD3.5-M 512 px
  python benchmarks/bench_train.py --smoke --out smoke_train.json                # CPU, tiny, seconds
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402
import step_lib as lib  # noqa: E402

from soar_fast.config import save_config_json  # noqa: E402

GOAL = 0.95


def trainer_config(args, spec: str, run_dir: Path):
    """The variant's TrainConfig as `soar-fast train` takes it, writing nothing but its log."""
    name, precision = lib.parse_variant(spec, args.precision)
    shape = lib.Shape(family=args.family, preset=args.preset, batch=args.batch, num_aux=args.num_aux,
                      latent=args.latent, text_len=args.text_len, micro_chunks=args.micro_chunks)
    cfg = lib.variant_config(name, precision, shape, args.device, compile_off=args.no_compile)
    cfg.runtime.output_dir = str(run_dir)
    cfg.optim.max_train_steps = args.steps
    cfg.logging.logging_steps = args.log_every
    cfg.logging.report_to = "none"
    cfg.logging.progress_bar = False
    cfg.logging.validation_images_per_class = 0
    cfg.checkpoint.checkpointing_steps = 0
    cfg.checkpoint.final_checkpoint = False
    cfg.checkpoint.save_final_model = False
    return cfg


def run_trainer(cfg, run_dir: Path, timeout: float) -> list[dict]:
    """`python -m soar_fast.train --config cfg.json`; its metrics.jsonl rows."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir.parent / f"{run_dir.name}.json"
    save_config_json(cfg, config)
    proc = subprocess.run([sys.executable, "-m", "soar_fast.train", "--config", str(config)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"soar-fast train exited {proc.returncode}: {tail[0][:200]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    p = bench_step.parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--variant", default="e", help="name[:precision] of bench_step's variants (not a)")
    p.add_argument("--steps", type=int, default=20, help="trainer steps (the first logging window is warm-up)")
    p.add_argument("--log_every", type=int, default=5, help="trainer logging_steps: one samples/s value per window")
    p.add_argument("--train_timeout", type=float, default=600)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = bench_step.parse_args([*argv, "--variants", ""], p)
    args.variants = [args.variant]
    if args.smoke:
        args.steps, args.log_every = min(args.steps, 6), 2
    name, precision = lib.parse_variant(args.variant, args.precision)
    if name == "a":
        p.error("variant a is the release's structure, not a trainer configuration; pick b..g or sft")
    results = lib.Results(args.out)
    bench_step.run(args, results)
    bench = {r["metric"]: r for r in results.rows if r.get("bench") == "soar_step" and r["provider"] == args.variant}
    if "samples_per_s" not in bench:
        results.add([{"bench": "trainer_e2e", "provider": args.variant, "metric": "error", "value": None, "unit": "",
                      "note": "the step benchmark did not measure this variant",
                      **lib.env_info(torch.device(args.device))}])
        return 1
    info = {k: bench["samples_per_s"][k] for k in ("device", "torch", "triton", "cuda", "commit", "date")}
    common = {"bench": "trainer_e2e", "provider": args.variant, "model": bench["samples_per_s"]["model"],
              "shape": bench["samples_per_s"]["shape"], "num_aux": bench["samples_per_s"]["num_aux"],
              "precision": precision, "config": bench["samples_per_s"]["config"], "steps": args.steps,
              "log_every": args.log_every, **info}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        run_dir = Path(tmp) / "run"
        try:
            logged = run_trainer(trainer_config(args, args.variant, run_dir), run_dir, args.train_timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            results.add([{**common, "metric": "error", "value": None, "unit": "", "note": str(err)[:240]}])
            return 1
    windows = [r["perf/samples_per_s"] for r in logged if r["step"] > args.log_every]
    if not windows:
        results.add([{**common, "metric": "error", "value": None, "unit": "", "note": "no window after warm-up"}])
        return 1
    trainer_sps, bench_sps = statistics.median(windows), bench["samples_per_s"]["value"]
    ratio = trainer_sps / bench_sps
    results.add([{**common, "metric": "trainer_samples_per_s", "value": trainer_sps, "unit": "samples/s",
                  "windows": windows, "note": f"median of logging windows after step {args.log_every}"},
                 {**common, "metric": "bench_samples_per_s", "value": bench_sps, "unit": "samples/s"},
                 {**common, "metric": "trainer_vs_bench", "value": ratio, "unit": "x", "goal": GOAL,
                  "meets_goal": ratio >= GOAL}])
    print(f"trainer {trainer_sps:.3f} samples/s vs step benchmark {bench_sps:.3f}: {ratio:.1%} "
          f"(goal >= {GOAL:.0%}) for {args.variant}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
