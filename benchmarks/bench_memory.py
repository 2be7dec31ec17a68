"""The memory planner's choices measured (issue 17 item 3): for each GPU size G (default 24, 48,
80 GiB), `soar_fast.train.plan.fit_to_memory` picks the cheapest flags that fit the SD3.5-M SOAR
step (512 px, M = 6, B = 2, the trainer's precision policy); the step is then built by
`build_train_step` with those flags and run under `torch.cuda.set_per_process_memory_fraction`
(G / the card's memory), so a choice that does not really fit fails with an out-of-memory row.
Rows (`bench: memory_fit`, provider `<G>GiB`): the measured `peak_memory` (max allocated, GiB)
beside `predicted_peak_gib`, ms per step, the flags, and whether it ran.

  python benchmarks/bench_memory.py --out memory.json             # GPU
  python benchmarks/bench_memory.py --smoke --out smoke.json      # CPU: tiny config, no fraction
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_lib as lib  # noqa: E402

from soar_fast.distributed import init_distributed  # noqa: E402
from soar_fast.models.lora import LoraSettings, apply_lora  # noqa: E402
from soar_fast.models.spec import get_family  # noqa: E402
from soar_fast.train.plan import GIB, fit_to_memory  # noqa: E402
from soar_fast.train.step import build_train_step  # noqa: E402


def measure(gib: float, args, info: dict) -> list[dict]:
    device = torch.device(args.device)
    shape = lib.Shape(preset=args.preset, batch=args.batch, num_aux=args.num_aux, latent=args.latent,
                      text_len=args.text_len)
    base = lib.variant_config("c", args.precision, shape, args.device)
    if args.lora_rank:
        base.model.lora_rank = args.lora_rank
    choice = fit_to_memory(base, gib)
    row = {"bench": "memory_fit", "provider": f"{gib:g}GiB", "gpu_memory_gib": gib, "model": f"sd3/{args.preset}",
           "shape": f"B{args.batch}x{args.latent}x{args.latent}+txt{args.text_len}", "num_aux": args.num_aux,
           "precision": args.precision, "flags": " ".join(choice.flags) or "(as is)",
           "predicted_peak_gib": choice.plan.peak / GIB, "planner_fits": choice.fits, **info}
    rows = [{**row, "metric": "predicted_peak_gib", "value": choice.plan.peak / GIB, "unit": "GiB"}]
    if not choice.fits:
        return rows + [{**row, "metric": "skipped", "value": None, "unit": "", "note": "no choice fits by the planner"}]
    lib.free_memory(device)
    family = get_family("sd3")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model = family.build(args.preset, seed=0, device=device)
        if choice.cfg.model.lora_rank:  # as soar_fast.train.build does: the base frozen, adapters train
            model = apply_lora(model, LoraSettings(rank=choice.cfg.model.lora_rank,
                                                   target_modules=tuple(family.lora_targets)))
        train_step = build_train_step(family, model, choice.cfg, init_distributed(None, device))
        z0, cond, uncond = lib.step_inputs(choice.cfg, device)
        counter = itertools.count()
        fn = lambda: train_step(next(counter), [(z0, cond, list(range(args.batch)))], uncond)  # noqa: E731
        times = lib.time_steps(fn, device, args.warmup, args.iters)
    except torch.OutOfMemoryError as err:
        return rows + [{**row, "metric": "error", "value": None, "unit": "",
                        "note": f"OOM under the {gib:g} GiB fraction: {str(err).splitlines()[0][:160]}"}]
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    _, p50, _ = lib.quantiles(times)
    counts = {"parameters": sum(q.numel() for q in model.parameters()),
              "trainable_parameters": sum(q.numel() for q in model.parameters() if q.requires_grad)}
    rows.append({**row, "metric": "ms_per_step_p50", "value": p50, "unit": "ms", "config": train_step.describe(), **counts})
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
        rows.append({**row, "metric": "peak_memory", "value": peak, "unit": "GiB",
                     "planner_error": (row["predicted_peak_gib"] - peak) / peak})
    lib.free_memory(device)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu_memory", default="24,48,80", help="comma list of GiB")
    p.add_argument("--preset", default="sd35-medium")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num_aux", type=int, default=6)
    p.add_argument("--text_len", type=int, default=154)
    p.add_argument("--precision", default="trainer", choices=list(lib.PRECISIONS))
    p.add_argument("--lora_rank", type=int, default=0, help="start from LoRA (0: a full fine-tune; the planner "
                   "adds LoRA rank 16 where nothing cheaper fits)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny config, fp32, on the CPU")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.latent = args.resolution // 8
    if args.smoke:
        args.preset, args.latent, args.text_len, args.precision, args.iters = "tiny", 8, 7, "fp32", 1
    results = lib.Results(args.out)
    info = lib.env_info(torch.device(args.device))
    for gib in [float(g) for g in args.gpu_memory.split(",") if g]:
        try:
            rows = measure(gib, args, info)
        except Exception as err:  # noqa: BLE001 - record it, go on with the next size
            traceback.print_exc()
            rows = [{"bench": "memory_fit", "provider": f"{gib:g}GiB", "metric": "error", "value": None, "unit": "",
                     "note": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}", **info}]
        results.add(rows)
        by = {r["metric"]: r for r in rows}
        peak = by.get("peak_memory", {}).get("value")
        print(f"{gib:>5g} GiB: {rows[0].get('flags', '-'):<60} predicted {rows[0].get('predicted_peak_gib', 0):6.2f} GiB"
              f"  measured {'-' if peak is None else f'{peak:6.2f} GiB'}"
              f"  {by['error']['note'] if 'error' in by else ''}", flush=True)
    results.add([])
    return 0 if not any(r["metric"] == "error" for r in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
