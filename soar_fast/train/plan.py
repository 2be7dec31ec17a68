"""The memory planner: the peak GPU memory per rank of a `TrainConfig`, predicted on a CPU.

`plan_memory(cfg, world_size)` returns a `MemoryPlan`: the predicted peak (`max_memory_allocated`)
and its parts. Method:

1. **The real module on the meta device** (`plan_probe.measure_model`): parameter counts (total,
   trainable, FP8-eligible, per FSDP2 unit) and the bytes autograd saves per sample in each block
   and outside them, measured by running the transformer's forward on meta tensors at the run's
   token counts (image + text) under `saved_tensors_hooks`, SDPA replaced by a shim saving what
   the flash / efficient kernels save (O(N), not O(N^2)). Eager activations are thus measured,
   not modelled: for SD3.5-M at 512 px it is 2.90 GiB per sample (72 bytes x width per token and
   block), diffusers' fp32 RMSNorm upcasts included. The no-grad forward's peak live bytes (a
   dispatch mode following tensor lifetimes) give the rollout's working set and CUDA-graph pool.
2. **The step's memory, by phase**, from the policy of `build_train_step` (`precision_dtypes`):
   master weights, gradients, AdamW states and EMA sharded 1/W by FSDP2; the unsharded
   compute-dtype copies FSDP2 all-gathers (the root unit plus two block units in flight, all of
   them with `reshard_after_forward=False`); the rollout replica (modes cuda_graph, fp8,
   cuda_graph_fp8, te_fp8: an unsharded compute-dtype copy), FP8 weight copies (one byte per
   eligible weight), the CUDA-graph pool; foreach AdamW's temporary (one state-sized list; none
   with fused AdamW) and EMA's fp32 casts. Phases: `backward start` (everything the forward saved,
   plus gradients already accumulated under micro-chunks or accumulation), `optimizer step`
   (full gradients and the optimizer's temporaries) and `rollout` (its no-grad working set). The
   peak is the largest phase; its parts add up to it.
3. **Three fitted constants** (`FIT`, from the 2026-11-26 H200 rows `step_512.json`: SD3.5-M,
   512 px, B=2, M=6, pure bf16, plain module): the backward's working set as a fraction of the
   largest block's saved bytes (row b), and the fraction of the eager activations that
   `torch.compile` keeps, with bf16 GEMMs (row d) and with FP8 training GEMMs (row g). Every other
   row (a, c, e, f, sft, sft_eager at 512 px; a, c, sft_eager at 1024 px) checks the model: within
   3.5 % (docs/sd35.md "Sizes and memory" has the table). Not measured on a GPU: FSDP2 (the
   trainer wraps even one rank), the fp32-master policy, LoRA, activation checkpointing,
   micro-chunks, the rollout replica. Allocator fragmentation, the CUDA context and library
   workspaces are outside `max_memory_allocated`; `fit_to_memory` keeps `MARGIN` for them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from soar_fast.config import ConfigError, TrainConfig
from soar_fast.train.plan_probe import ModelStats, measure_model
from soar_fast.train.step import precision_dtypes

__all__ = ["FIT", "Harness", "MemoryPlan", "PARTS", "TRAINER", "Choice", "fit_to_memory", "plan_memory", "plan_target", "print_plan"]

GIB = 2**30
_REPLICA_MODES = ("cuda_graph", "fp8", "cuda_graph_fp8", "te_fp8")
_GRAPH_MODES = ("cuda_graph", "cuda_graph_fp8")
_FP8_MODES = ("fp8", "cuda_graph_fp8", "te_fp8")
PARTS = ("weights", "compute_copies", "gradients", "optimizer_states", "optimizer_temporaries", "ema", "activations",
         "rollout_activations", "rollout_replica", "cuda_graph_pools", "fp8_weight_copies")
#: Fitted on benchmarks/results/h200/2026-11-26/step_512.json (see the module docstring).
FIT = {"backward_working_set": 0.411, "compile": 0.676, "compile_fp8_training": 0.145}
#: GiB kept free by `fit_to_memory`: fraction of the card, plus the CUDA context and workspaces.
MARGIN = (0.05, 1.0)


@dataclass(frozen=True)
class Harness:
    """How a step is assembled around the model: the trainer's (`TRAINER`), or a benchmark's."""

    fsdp: bool = True
    """FSDP2 units at any world size (the trainer); False: a plain module, as the 2026-11-26 rows."""
    fused_adamw: bool = False
    """torch AdamW(fused=True), no temporaries; the trainer's AdamW is torch's default (foreach)."""
    replica: bool = True
    """CUDA-graph / FP8 rollout modes run on their own compute-dtype copy (the trainer); False: on
    the training module (the benchmark of 2026-11-26)."""
    recorded_rollout: bool = False
    """The reference release's structure (variant a): the rollout recorded by autograd and its 2B
    samples' activations kept to the end of the step, the M auxiliary passes one by one."""
    carried_fp8: bool = False
    """FP8 rollout copies left attached by an earlier variant (the 2026-11-26 benchmark reused one module)."""
    name: str = "trainer"


TRAINER = Harness()


@dataclass
class MemoryPlan:
    """Predicted peak GPU memory per rank (bytes) and its parts at the peak phase."""

    peak: float
    phase: str
    parts: dict[str, float]
    phases: dict[str, dict[str, float]]
    activations_no_ac: float
    """Training-pass activations without activation checkpointing (the `activations` part's basis)."""
    activations_ac: float
    """... and with it."""
    world_size: int
    samples: int
    """Samples in one training forward ((1+M)B / micro-chunks)."""
    stats: ModelStats
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def table(self, title: str = "") -> str:
        """One table: each part of the peak phase, the peak, the other phases' totals."""
        rows = [title] if title else []
        rows.append(f"{'part':<24}{'GiB':>9}")
        for name in PARTS:
            rows.append(f"{name:<24}{self.parts[name] / GIB:9.2f}")
        rows.append(f"{'peak per rank':<24}{self.peak_gib:9.2f}   (at {self.phase}; world size {self.world_size})")
        others = ", ".join(f"{p} {sum(v.values()) / GIB:.2f}" for p, v in self.phases.items() if p != self.phase)
        rows.append(f"other phases: {others}")
        rows.append(f"training-pass activations: {self.activations_no_ac / GIB:.2f} GiB without activation "
                    f"checkpointing, {self.activations_ac / GIB:.2f} with ({self.samples} samples per forward)")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _activations(s: ModelStats, samples: int, passes: int, extra: int, ac: bool, compile_factor: float) -> float:
    """Saved bytes at backward start: `samples` in the backward, `extra` more kept alive (a recorded
    rollout), `passes` forwards (each saves `pass_saved`)."""
    biggest = max(s.blocks_saved) if s.blocks_saved else 0.0
    work = FIT["backward_working_set"] * biggest * samples
    if ac:  # each block keeps its inputs; backward recomputes one block at a time
        kept = (samples + extra) * s.block_inputs
        return kept + compile_factor * ((samples + extra) * s.outside_saved + biggest * samples + work)
    full = (samples + extra) * (sum(s.blocks_saved) + s.outside_saved) + passes * s.pass_saved
    return compile_factor * (full + work)


def plan_memory(cfg: TrainConfig, world_size: int = 1, *, harness: Harness = TRAINER) -> MemoryPlan:
    """Predict the peak GPU memory per rank of `cfg`'s training step at `world_size` ranks.

    Measures `cfg`'s transformer on the meta device (seconds; cached) and combines it with the
    step's precision policy, sharding, rollout mode and converters; see the module docstring for
    the method and its error."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: need >= 1")
    weight_dt, compute_dt, reduce_dt = precision_dtypes(cfg)
    s = measure_model(cfg, compute_dt)
    fast, oc, soar = cfg.fast, cfg.optim, cfg.soar
    wb, cb, rb = _bytes(weight_dt), _bytes(compute_dt), _bytes(reduce_dt)
    shard = world_size if harness.fsdp else 1
    notes: list[str] = []
    fast_step = cfg.runtime.step == "fast"
    b, m = oc.train_batch_size, soar.num_aux
    train_samples = (1 + m) * b
    chunks = fast.micro_chunks if fast_step else 1
    if not fast_step and fast.micro_chunks > 1:
        notes.append("micro-chunks apply to the fast step only (--runtime.step fast); the eager step runs one batch")
    samples = math.ceil(train_samples / chunks)
    passes = 1 if fast_step else 1 + (m > 0) * m
    extra = 2 * b if (harness.recorded_rollout and m > 0) else 0
    passes += 1 if extra else 0
    if fast.compile == "none":
        factor = 1.0
    else:
        factor = FIT["compile_fp8_training"] if fast.fp8_training else FIT["compile"]
    act_no = _activations(s, samples, passes, extra, False, factor)
    act_ac = _activations(s, samples, passes, extra, True, factor)
    act = act_ac if fast.activation_checkpointing else act_no

    master = s.total * wb / shard
    grads = s.trainable * wb / shard
    states = 2 * s.trainable * wb / shard
    ema = s.trainable * 4 / shard if oc.use_ema else 0.0
    opt_tmp = 0.0 if harness.fused_adamw else s.trainable * wb / shard
    ema_tmp = s.trainable * 4 / shard if (oc.use_ema and wb != 4) else 0.0
    unit = max(s.units) if s.units else 0
    if harness.fsdp:  # FSDP2's all-gather outputs; the root unit stays gathered from forward to backward
        gathered = (s.root + (sum(s.units) if not cfg.parallel.reshard_after_forward else 2 * unit)) * cb
        in_flight = unit * (cb + rb) * (s.trainable / s.total)  # a unit's unsharded grads before reduce-scatter
        rollout_gathered = (s.root + 2 * unit) * cb
    else:
        gathered = in_flight = rollout_gathered = 0.0
        if compute_dt != weight_dt:
            notes.append("a plain module computing in another dtype than its weights is autocast: not modelled")
    uses_replica = fast_step and fast.rollout in _REPLICA_MODES and m > 0
    replica = s.total * cb if (uses_replica and harness.replica) else 0.0
    fp8 = s.fp8_eligible * 1.0 if (fast_step and fast.rollout in _FP8_MODES and m > 0) else 0.0
    fp8 += s.fp8_eligible * 1.0 if harness.carried_fp8 else 0.0
    pool = 2 * b * s.nograd_peak if (fast_step and fast.rollout in _GRAPH_MODES and m > 0) else 0.0
    rollout_ws = 2 * b * s.nograd_peak if m > 0 and not pool else 0.0
    accumulated = grads if (chunks > 1 or oc.gradient_accumulation_steps > 1) else 0.0

    common = {"weights": master, "optimizer_states": states, "ema": ema, "rollout_replica": replica,
              "cuda_graph_pools": pool, "fp8_weight_copies": fp8}
    phases = {
        "backward start": {**common, "compute_copies": gathered, "gradients": accumulated + in_flight,
                           "activations": act},
        "optimizer step": {**common, "gradients": grads, "optimizer_temporaries": max(opt_tmp, ema_tmp)},
        "rollout": {**common, "compute_copies": 0.0 if uses_replica and harness.replica else rollout_gathered,
                    "gradients": accumulated, "rollout_activations": rollout_ws},
    }
    phases = {p: {k: float(v.get(k, 0.0)) for k in PARTS} for p, v in phases.items()}
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    if s.assumed:
        notes.append(s.assumed)
    if harness.fsdp and world_size == 1:
        notes.append("FSDP2 over one rank (the trainer's habit): shards are whole, all-gathers still copy")
    if fast.rollout == "te_fp8":
        notes.append("te_fp8: Transformer Engine's own FP8 weight caches are taken as one byte per weight")
    return MemoryPlan(peak=sum(phases[phase].values()), phase=phase, parts=phases[phase], phases=phases,
                      activations_no_ac=act_no, activations_ac=act_ac, world_size=world_size, samples=samples,
                      stats=s, notes=notes)


@dataclass
class Choice:
    """What `fit_to_memory` chose: the flags to add, the plan with them, whether it fits."""

    flags: list[str]
    cfg: TrainConfig
    plan: MemoryPlan
    fits: bool
    budget: float
    notes: list[str]


#: Asked for by the planner's order of cost but not options of the trainer today.
MISSING = ("FP8 storage of the frozen base: no option stores weights in FP8 (fast.fp8_training and the FP8 "
           "rollout keep FP8 copies beside them)",
           "8-bit AdamW: no option (the optimizer is torch AdamW); its states are sharded only by FSDP2 over W > 1 ranks")


def usable_bytes(gpu_gib: float) -> float:
    """What a card of `gpu_gib` GiB leaves to `max_memory_allocated` (see `MARGIN`)."""
    return (gpu_gib * (1 - MARGIN[0]) - MARGIN[1]) * GIB


def _with(cfg: TrainConfig, **changes) -> TrainConfig:
    out = dataclasses.replace(cfg)
    for path, value in changes.items():
        section, name = path.split("__")
        setattr(out, section, dataclasses.replace(getattr(out, section), **{name: value}))
    return out


def fit_to_memory(cfg: TrainConfig, gpu_gib: float, world_size: int = 1, *, lora_rank: int = 16) -> Choice:
    """Add, in this order of cost, micro-chunks, activation checkpointing, LoRA (`lora_rank`) and
    bf16 storage (the frozen base, the nearest option to FP8 storage), each stage keeping the ones
    before and taking the fewest micro-chunks that fit, until `cfg` fits `gpu_gib` GiB per rank.
    Options the trainer lacks (FP8 storage, 8-bit AdamW) are named in `notes`."""
    budget = usable_bytes(gpu_gib)
    notes = list(MISSING)
    stages: list[tuple[list[str], dict]] = [([], {})]
    if not cfg.fast.activation_checkpointing:
        stages.append((["--fast.activation_checkpointing"], {"fast__activation_checkpointing": True}))
    if not cfg.model.lora_rank:
        stages.append((stages[-1][0] + [f"--model.lora_rank {lora_rank}"],
                       {**stages[-1][1], "model__lora_rank": lora_rank}))
    if cfg.runtime.weight_dtype != "bf16":
        stages.append((stages[-1][0] + ["--runtime.weight_dtype bf16"],
                       {**stages[-1][1], "runtime__weight_dtype": "bf16"}))
    samples = (1 + cfg.soar.num_aux) * cfg.optim.train_batch_size
    chunk_options = [1] + ([c for c in (2, 4, 7, 8, 14, 16, 28, 32) if c < samples] + [samples]
                           if cfg.runtime.step == "fast" and samples > 1 else [])
    last = None
    for flags, changes in stages:
        for chunks in chunk_options:
            extra = {} if chunks == cfg.fast.micro_chunks else {"fast__micro_chunks": max(chunks, cfg.fast.micro_chunks)}
            c = _with(cfg, **changes, **extra)
            plan = plan_memory(c, world_size)
            chunk_flag = [f"--fast.micro_chunks {c.fast.micro_chunks}"] if c.fast.micro_chunks != cfg.fast.micro_chunks else []
            last = Choice(flags=chunk_flag + flags, cfg=c, plan=plan, fits=plan.peak <= budget, budget=budget,
                          notes=notes)
            if last.fits:
                if "--runtime.weight_dtype bf16" in flags:
                    notes.append("--runtime.weight_dtype bf16 also keeps the trained weights' master copy and "
                                 "AdamW states in bf16 (pure bf16)")
                return last
    assert last is not None
    for w in (2, 4, 8, 16, 32, 64):
        if w > world_size and plan_memory(last.cfg, w).peak <= budget:
            notes.append(f"with FSDP2 over {w} GPUs of {gpu_gib:g} GiB (torchrun --nproc_per_node {w}) "
                         "the last choice would fit: sharding divides weights, gradients and AdamW states")
            break
    return last


def print_plan(cfg: TrainConfig, world: int, gpu: float | None) -> None:
    """`soar-fast plan`: the table of `cfg` at `world` ranks; with `gpu` (GiB) whether it fits, or
    the cheapest flags that make it fit (a ConfigError when none does, naming the smallest GPU)."""
    plan = plan_memory(cfg, world)
    s, mc = plan.stats, cfg.model
    model = mc.pretrained_model_name_or_path or f"{mc.family}/{mc.preset}"
    fast = cfg.fast
    title = (f"soar-fast plan: {model} ({s.total / 1e9:.2f} B params, {s.trainable / 1e6:.1f} M trained), "
             f"{s.tokens} tokens per sample, B={cfg.optim.train_batch_size}, M={cfg.soar.num_aux}, "
             f"step {cfg.runtime.step}, rollout {fast.rollout}, compile {fast.compile}, weights "
             f"{cfg.runtime.weight_dtype}, mixed_precision {cfg.runtime.mixed_precision}")
    print(plan.table(title))
    if gpu is None:
        return
    choice = fit_to_memory(cfg, gpu, world)
    budget = choice.budget / GIB
    if plan.peak <= choice.budget:
        print(f"fits {gpu:g} GiB: {plan.peak_gib:.2f} of {budget:.2f} GiB usable (the rest: CUDA context, "
              "workspaces, fragmentation)")
        return
    for note in choice.notes:
        print(f"not an option today: {note}" if note.startswith(("FP8 storage", "8-bit")) else f"note: {note}")
    if not choice.fits:
        need = choice.plan.peak_gib
        raise ConfigError(f"--gpu_memory {gpu:g} is too small for any choice: with {' '.join(choice.flags)} the step "
                          f"needs {need:.2f} GiB, so a GPU of about {(need + MARGIN[1]) / (1 - MARGIN[0]):.0f} GiB at "
                          "the least")
    print(f"choice for {gpu:g} GiB: add {' '.join(choice.flags)} -> predicted peak {choice.plan.peak_gib:.2f} GiB "
          f"of {budget:.2f} usable")


def plan_target(world_size: str | None, gpu_memory: str | None) -> tuple[int, float | None]:
    """(ranks, GiB per GPU or None) of `soar-fast plan --world_size N --gpu_memory GiB|auto`;
    the world size defaults to $WORLD_SIZE or 1, `auto` reads the visible GPU."""
    world = world_size or os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise ConfigError(f"--world_size {world!r} is invalid: pass the number of ranks, e.g. 8")
    gpu = None
    if gpu_memory == "auto":
        if not torch.cuda.is_available():
            raise ConfigError("--gpu_memory auto needs a visible CUDA GPU; pass the card's GiB instead, e.g. --gpu_memory 24")
        gpu = torch.cuda.get_device_properties(0).total_memory / 2**30
    elif gpu_memory is not None:
        try:
            gpu = float(gpu_memory)
        except ValueError:
            gpu = -1.0
        if not gpu > 0:
            raise ConfigError(f"--gpu_memory {gpu_memory!r} is invalid: pass GiB per GPU (e.g. 24) or auto")
    return int(world), gpu
