"""What the memory planner (`soar_fast.train.plan`) measures on the real module, without a GPU.

The transformer of a `TrainConfig` is built on the meta device (a preset, or a folder's
config.json: no weights are read), converted as `build_train_step` would (LoRA, the FP8 training
swap) and cast to the compute dtype; then one forward at the run's real token counts runs on meta
tensors (no FLOPs, no memory):
  - with grad, under `torch.autograd.graph.saved_tensors_hooks`: the bytes autograd saves for
    backward, per transformer block and outside the blocks, parameters excluded, views counted
    once. SDPA is replaced by a shim that saves what the flash / memory-efficient kernels save
    (q, k, v, out and the fp32 log-sum-exp: O(N), not the O(N^2) of the math path meta would run);
  - the inputs each block receives (what activation checkpointing keeps per block);
  - without grad, under a dispatch mode that follows tensor lifetimes: the peak live bytes of the
    rollout's no-grad forward (its working set; a CUDA graph's pool keeps that much).
One and two samples are run: the difference is the per-sample part, the rest per forward pass
(FP8 training saves an FP8 copy of every eligible weight per pass).
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from soar_fast.config import ConfigError, TrainConfig
from soar_fast.models.spec import ModelFamily, family_of_folder, get_family

__all__ = ["ModelStats", "measure_model"]


@dataclass(frozen=True)
class ModelStats:
    """Parameter counts and the activation profile of one model at one shape (bytes, per rank)."""

    family: str
    total: int
    """All parameters (LoRA adapters included)."""
    trainable: int
    """Parameters that require grad (the adapters under LoRA)."""
    fp8_eligible: int
    """Weights of the Linears the FP8 paths switch (attention and MLP projections in the blocks)."""
    units: tuple[int, ...]
    """Parameters of each FSDP2 unit: one per transformer block."""
    root: int
    """Parameters outside the blocks (the root FSDP2 unit: embedders, final norm, projection)."""
    blocks_saved: tuple[float, ...]
    """Bytes autograd saves per sample in each block (training forward, eager)."""
    outside_saved: float
    """Bytes saved per sample outside the blocks."""
    pass_saved: float
    """Bytes saved per forward pass whatever the sample count (FP8 training's weight copies)."""
    block_inputs: float
    """Bytes per sample of all blocks' inputs (what activation checkpointing keeps)."""
    nograd_peak: float
    """Peak live bytes per sample of a no-grad forward (the rollout's working set)."""
    width: int
    tokens: int
    latent_channels: int
    assumed: str = ""
    """What the measurement had to assume (no latent cache to read the shape from)."""
    """The longest sequence attention saw per sample (image + text tokens of a joint block)."""


class _FlashLike(torch.autograd.Function):
    """SDPA's autograd footprint under the flash / efficient kernels: q, k, v, out, lse [B, H, N] fp32."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa_shim(seen: list[int]):
    """`F.scaled_dot_product_attention` on meta tensors with the fused kernels' footprint; records
    the sequence lengths it sees in `seen`."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value
        seen.append(int(q.shape[-2]))
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention: the kernels read k, v un-repeated
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        return _FlashLike.apply(q, k, v) if torch.is_grad_enabled() else torch.empty_like(q)

    return sdpa


class _LivePeak(TorchDispatchMode):
    """Peak bytes of the tensors alive at once (outputs of non-view ops, freed with their last reference)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        if not aliases:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    weakref.finalize(t, self._free, n)
            self.peak = max(self.peak, self.live)
        return out


def _model_on_meta(cfg: TrainConfig) -> tuple[ModelFamily, nn.Module]:
    mc = cfg.model
    meta = torch.device("meta")
    if mc.pretrained_model_name_or_path:
        local = os.path.expanduser(mc.pretrained_model_name_or_path)
        path = os.path.join(local, mc.subfolder, "config.json") if mc.subfolder else os.path.join(local, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model folder {mc.pretrained_model_name_or_path!r} has no {os.path.relpath(path, local)}:"
                              " the planner reads the transformer's config.json (no weights); pass a diffusers folder")
        family = family_of_folder(local, mc.subfolder)
        with open(path) as f:
            config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        with meta:
            model = family.cls().from_config(config)
    else:
        family = get_family(mc.family)
        over = {n: getattr(mc, n) for n in ("num_layers", "num_attention_heads", "attention_head_dim")
                if getattr(mc, n) is not None}
        if family.name == "sd3" and ("num_attention_heads" in over or "attention_head_dim" in over):
            base = family.presets[mc.preset]
            over["caption_projection_dim"] = (over.get("num_attention_heads", base["num_attention_heads"])
                                              * over.get("attention_head_dim", base["attention_head_dim"]))
        model = family.build(mc.preset, seed=None, device=meta, **over)
    if mc.lora_rank:
        from soar_fast.models.lora import LoraSettings, apply_lora

        apply_lora(model, LoraSettings(rank=mc.lora_rank, lora_alpha=mc.lora_alpha,
                                       target_modules=tuple(mc.lora_target_modules or family.lora_targets)))
    return family, model


def _inputs(cfg: TrainConfig, family: ModelFamily, model: nn.Module, n: int, dtype: torch.dtype):
    """Meta inputs of `n` samples with the shapes the run's data has."""
    from soar_fast.data import build_dataset

    data, reference = cfg.data, False
    if data.source == "latents":
        shape = _cache_shape(data.data_dir, cfg.model.family, cfg.recipe)
        reference = bool(shape.pop("reference", False))
        data = dataclasses.replace(data, source="synthetic", data_dir=None, **shape)
    elif data.source == "digits":
        data = dataclasses.replace(data, source="synthetic", latent_size=data.resolution)
    data = dataclasses.replace(data, num_samples=2)
    text_dim, pooled_dim = family.text_dims(model.config)
    ds = build_dataset(data, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
                       latent_channels=family.latent_channels(model.config))
    z0, cond, _ = ds.batch(torch.arange(n))
    if reference:  # a FLUX.1 Kontext cache: reference latents of the image's size ride in every model call
        cond = (*cond, z0.clone())
    meta = lambda t: t.to(device="meta", dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    cond = tuple(meta(c) for c in cond) if isinstance(cond, tuple) else meta(cond)
    return meta(z0), torch.rand(n, device="meta"), cond


def _cache_shape(data_dir: str | None, family: str = "sd3", recipe: str | None = None) -> dict[str, Any]:
    """Latent side, text length (and frames of a video cache) of a latent cache, read lazily; the
    family's default shape (`default_shape`) without one."""
    try:
        from soar_fast.data.latents import LatentsDataset

        ds = LatentsDataset(data_dir or "", verify_hashes=False)
        z0, cond, _ = ds.batch(torch.arange(1))
        text = cond[0] if isinstance(cond, tuple) else cond
        shape = {"latent_size": int(z0.shape[-1]), "prompt_tokens": int(text.shape[1])}
        shape |= {"reference": 1} if getattr(ds, "has_reference", False) else {}
        return shape | ({"latent_frames": int(z0.shape[2])} if z0.dim() == 5 else {})
    except Exception:  # noqa: BLE001 - no cache yet: plan the family's default shape
        return default_shape(family, recipe)


#: What the planner assumes without a cache: 512 px latents (64 x 64) and SD3.5's 154 text tokens;
#: for video (Wan) 81 frames (21 latent frames) at 512 x 512 px and umT5's 512 padded tokens.
_DEFAULT_SHAPE = {"latent_size": 64, "prompt_tokens": 154}
_VIDEO_SHAPE = {"latent_size": 64, "prompt_tokens": 512, "latent_frames": 21}


def default_shape(family: str, recipe: str | None = None) -> dict[str, int]:
    """The shape planned without a cache; a Kontext recipe's (`FamilyRecipe.reference`) adds its reference latents."""
    from soar_fast.config.recipes import FAMILY_RECIPES

    kontext = any(r.reference for r in FAMILY_RECIPES if r.name == recipe)
    return dict(_VIDEO_SHAPE if family == "wan" else _DEFAULT_SHAPE) | ({"reference": 1} if kontext else {})


def _key(cfg: TrainConfig, compute: torch.dtype) -> str:
    """What the measurement depends on: the architecture, LoRA, FP8 training, the data shape, the dtype."""
    data = cfg.data
    shape = _cache_shape(data.data_dir, cfg.model.family, cfg.recipe) if data.source == "latents" else {
        "latent_size": data.resolution if data.source == "digits" else data.latent_size,
        "prompt_tokens": data.prompt_tokens}
    model = dataclasses.asdict(cfg.model)
    model.pop("init_seed")
    d = {"model": model, "shape": shape, "frames": getattr(data, "latent_frames", 0), "source": data.source,
         "fp8": cfg.fast.fp8_training, "dtype": str(compute)}
    return json.dumps(d, sort_keys=True, default=str)


_CACHE: dict[str, ModelStats] = {}


def measure_model(cfg: TrainConfig, compute: torch.dtype) -> ModelStats:
    """The `ModelStats` of `cfg`'s transformer at its data shape, computing in `compute` (cached
    per model, data shape, FP8 training and dtype: a measurement takes seconds)."""
    key = _key(cfg, compute)
    if key not in _CACHE:
        _CACHE[key] = _measure(cfg, compute)
    return _CACHE[key]


def _measure(cfg: TrainConfig, compute: torch.dtype) -> ModelStats:
    family, model = _model_on_meta(cfg)
    if cfg.fast.fp8_training:
        from soar_fast.fast.fp8 import enable_fp8_training

        enable_fp8_training(model)
    from soar_fast.train.step import _to

    model = _to(model, torch.device("meta"), compute)  # as the trainer casts (fp32 modules kept)
    from soar_fast.fast.fp8 import _eligible

    blocks = family.blocks(model)
    units = tuple(sum(p.numel() for p in b.parameters()) for b in blocks)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    eligible = sum(m.weight.numel() for name, m in model.named_modules() if _eligible(name, m)
                   or type(m).__name__ == "Fp8TrainLinear")
    runs = [_profile(family, model, blocks, *_inputs(cfg, family, model, n, compute)) for n in (1, 2)]
    (b1, o1, i1, _p1, _t1), (b2, o2, i2, p2, tokens) = runs
    z0 = _inputs(cfg, family, model, 1, compute)[0]
    width = int(getattr(model.config, "num_attention_heads", 1) * getattr(model.config, "attention_head_dim", 1))
    return ModelStats(
        family=family.name, total=total, trainable=trainable, fp8_eligible=eligible, units=units,
        root=total - sum(units), blocks_saved=tuple(y - x for x, y in zip(b1, b2)), outside_saved=o2 - o1,
        pass_saved=max(0.0, (sum(b1) + o1) * 2 - (sum(b2) + o2)), block_inputs=i2 - i1,
        nograd_peak=p2 / 2, width=width, tokens=tokens,
        latent_channels=int(z0.shape[1]), assumed=_assumed(cfg))


def _assumed(cfg: TrainConfig) -> str:
    shape = default_shape(cfg.model.family, cfg.recipe)
    if cfg.data.source != "latents" or _cache_shape(cfg.data.data_dir, cfg.model.family, cfg.recipe) != shape:
        return ""
    px = 8 * shape["latent_size"]
    frames = f", {4 * (shape['latent_frames'] - 1) + 1} frames" if "latent_frames" in shape else ""
    ref = ", an input image of the same size" if shape.get("reference") else ""
    return (f"no readable latent cache at {cfg.data.data_dir!r}: planned {shape['latent_size']}x"
            f"{shape['latent_size']} latents ({px} px{frames}{ref}) and {shape['prompt_tokens']} text tokens")


def _profile(family: ModelFamily, model: nn.Module, blocks, z, sigma, cond):
    """(saved bytes per block, saved bytes outside, block input bytes, no-grad peak live bytes,
    longest attention sequence)."""
    skip = {id(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, torch.Tensor] = {}
    per_block = [0.0] * len(blocks)
    outside = [0.0]
    inputs: dict[int, torch.Tensor] = {}
    current = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in seen and id(base) not in skip:
            seen[id(base)] = base
            n = base.untyped_storage().nbytes()
            if current[0] >= 0:
                per_block[current[0]] += n
            else:
                outside[0] += n
        return t

    def pre(i):
        def hook(_m, args, kwargs):
            current[0] = i
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in skip:
                    inputs.setdefault(id(t), t)
        return hook

    def post(_m, _a, _k, _o):
        current[0] = -1

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    vf = family.velocity(model)
    orig = F.scaled_dot_product_attention
    seqs: list[int] = []
    F.scaled_dot_product_attention = _sdpa_shim(seqs)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vf(z, sigma, cond)
        for h in handles:
            h.remove()
        handles = []
        live = _LivePeak()
        with torch.no_grad(), live:
            vf(z, sigma, cond)
    finally:
        F.scaled_dot_product_attention = orig
        for h in handles:
            h.remove()
    in_bytes = float(sum(t.untyped_storage().nbytes() for t in inputs.values()))
    return per_block, outside[0], in_bytes, float(live.peak), max(seqs, default=0)
