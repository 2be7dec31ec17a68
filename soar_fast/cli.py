"""`soar-fast` command line. Interim: `demo` trains a tiny SD3 model with SOAR on random latents."""

from __future__ import annotations

import argparse
import logging
import time

import torch

import soar_fast as sf
from soar_fast.models import SD3VelocityFn, build_sd3_transformer


def _demo(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = build_sd3_transformer("tiny", seed=args.seed)
    velocity_fn = SD3VelocityFn(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    z0 = torch.randn(8, 4, 8, 8, generator=gen)
    cond = (torch.randn(8, 7, 32, generator=gen), torch.randn(8, 64, generator=gen))
    uncond = (torch.zeros(7, 32), torch.zeros(64))
    cfg = sf.SoarConfig(num_aux=args.num_aux)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = sf.soar_loss(velocity_fn, z0, cond, uncond, cfg, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        m = out.metrics
        print(f"step {step:3d}  loss {m['loss']:.4f}  base {m['base_loss']:.4f}  aux {m['aux_loss']:.4f}"
              f"  rollout_dev {m['rollout_deviation']:.4f}")
    print(f"{args.steps} SOAR steps in {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="soar-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="short SOAR training of a tiny SD3 model on random latents")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--num_aux", type=int, default=6)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        _demo(args)


if __name__ == "__main__":
    main()
