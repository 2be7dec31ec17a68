"""External image scorers behind one small interface, and `soar-fast eval --prompts`.

The interface (all a scorer needs):
```python
class Scorer(Protocol):
    name: str
    def score(self, images: list[PIL.Image.Image], prompts: list[str]) -> list[float]: ...
```
one float per image, higher is better, `prompts[i]` being the prompt of `images[i]`.

Scorers are found lazily by name. `SCORERS` maps a short name to an import target
`"module:factory"` plus the import names it needs; a scorer whose package is missing (or whose
factory fails, e.g. weights not on disk) is skipped with a one-line message, never a crash. Any
`"package.module:factory"` also works as a name, so users plug in their own scorer without
touching soar_fast; `register_scorer` adds a short name.

Built-in adapters (thin wrappers; each imports its package only when created):
- `clip_score`: CLIPScore = 100 * max(cos(image, text), 0) with a transformers CLIP model
  (`model_name_or_path`, default openai/clip-vit-large-patch14).
- `pickscore`: PickScore = logit_scale * cos with yuvalkirstain/PickScore_v1 (transformers).
- `imagereward`: the `ImageReward` package (`ImageReward.load("ImageReward-v1.0")`).
- `hpsv2`: the `hpsv2` package (`hpsv2.score(images, prompt, hps_version="v2.1")`).
- `ocr`: 1 - normalised edit distance between the text in quotes of the prompt and the text an
  OCR reader finds (the Flow-GRPO OCR reward); reader `easyocr` by default or any callable.
GenEval runs an object detector from its own repository, so it is not a Scorer: with
`geneval_layout=True`, `run_external_eval` writes images in the folder layout GenEval's
`evaluation/evaluate_images.py` reads (`<out>/geneval/<i:05d>/{metadata.jsonl, samples/*.png}`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from soar_fast.config import ConfigError

__all__ = [
    "SCORERS",
    "ClipScorer",
    "ExternalEvalConfig",
    "OcrScorer",
    "Scorer",
    "ScorerSpec",
    "load_scorers",
    "register_scorer",
    "run_external_eval",
    "score_images",
    "write_geneval_layout",
]

log = logging.getLogger(__name__)


@runtime_checkable
class Scorer(Protocol):
    """An image scorer: `score(images, prompts)` returns one float per image (higher is better)."""

    name: str

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]: ...


@dataclass(frozen=True)
class ScorerSpec:
    """Where a scorer lives: `target` is "module:factory" (a class or function returning a Scorer,
    called with the user's options as kwargs); `requires` are import names checked first."""

    name: str
    target: str
    requires: tuple[str, ...] = ()
    description: str = ""


SCORERS: dict[str, ScorerSpec] = {}


def register_scorer(name: str, target: str, requires: Sequence[str] = (), description: str = "") -> ScorerSpec:
    """Add (or replace) a short scorer name -> "module:factory"."""
    if ":" not in target:
        raise ValueError(f"scorer target {target!r} must be 'module.path:factory'")
    spec = ScorerSpec(name, target, tuple(requires), description)
    SCORERS[name] = spec
    return spec


_ME = __name__
register_scorer("clip_score", f"{_ME}:ClipScorer", ("transformers",), "100 * max(cos, 0), transformers CLIP")
register_scorer("pickscore", f"{_ME}:pickscore", ("transformers",), "PickScore_v1 (transformers CLIP)")
register_scorer("imagereward", f"{_ME}:ImageRewardScorer", ("ImageReward",), "ImageReward-v1.0")
register_scorer("hpsv2", f"{_ME}:HpsV2Scorer", ("hpsv2",), "HPS v2.1")
register_scorer("ocr", f"{_ME}:OcrScorer", ("easyocr",), "1 - edit distance to the quoted text (easyocr)")


def _spec_for(name: str) -> ScorerSpec:
    if name in SCORERS:
        return SCORERS[name]
    if ":" in name:
        return ScorerSpec(name, name, (name.split(":")[0].split(".")[0],))
    raise ConfigError(f"unknown scorer {name!r}: choose from {', '.join(SCORERS)} or give 'module.path:factory'")


def load_scorers(
    names: Sequence[str], options: dict[str, dict[str, Any]] | None = None
) -> tuple[list[Scorer], dict[str, str]]:
    """Create the named scorers; returns (scorers, {name: why skipped}). Missing packages and
    failing factories are skipped with one log line each."""
    options = options or {}
    scorers: list[Scorer] = []
    skipped: dict[str, str] = {}
    for name in names:
        spec = _spec_for(name)
        missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
        if missing:
            skipped[name] = f"package {', '.join(missing)} not installed"
        else:
            module, _, attr = spec.target.partition(":")
            try:
                factory = getattr(importlib.import_module(module), attr)
                scorer = factory(**options.get(name, {}))
            except Exception as e:  # noqa: BLE001 - a scorer failing to load must not stop the eval
                skipped[name] = f"failed to load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            else:
                if not isinstance(scorer, Scorer):
                    skipped[name] = f"{spec.target} returned {type(scorer).__name__}, which has no name/score()"
                else:
                    scorers.append(scorer)
                    continue
        log.warning("scorer %s skipped: %s", name, skipped[name])
    return scorers, skipped


def score_images(
    scorers: Sequence[Scorer], images: list[Image.Image], prompts: list[str], batch_size: int = 16
) -> dict[str, dict[str, Any]]:
    """Run every scorer over the images in batches: {name: {"mean": float, "per_image": [...]}}."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = {}
    for sc in scorers:
        vals: list[float] = []
        for s in range(0, len(images), batch_size):
            got = [float(v) for v in sc.score(images[s : s + batch_size], prompts[s : s + batch_size])]
            if len(got) != len(images[s : s + batch_size]):
                raise ValueError(f"scorer {sc.name} returned {len(got)} scores for {len(images[s:s+batch_size])} images")
            vals += got
        finite = [v for v in vals if math.isfinite(v)]
        out[sc.name] = {"mean": sum(finite) / len(finite) if finite else float("nan"), "per_image": vals}
    return out


# ---------------------------------------------------------------- built-in adapters


class ClipScorer:
    """CLIPScore (`kind="clipscore"`: 100 * max(cos, 0)) or PickScore (`kind="logits"`:
    logit_scale * cos) with a transformers `CLIPModel` and its processor."""

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        processor_name_or_path: str | None = None,
        kind: Literal["clipscore", "logits"] = "clipscore",
        device: str = "auto",
        name: str | None = None,
        local_files_only: bool = False,
    ):
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.name = name or ("clip_score" if kind == "clipscore" else "pickscore")
        self.kind = kind
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.processor = AutoProcessor.from_pretrained(processor_name_or_path or model_name_or_path,
                                                       local_files_only=local_files_only)
        self.model = CLIPModel.from_pretrained(model_name_or_path, local_files_only=local_files_only)
        self.model.to(self.device).eval()

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        import torch

        inputs = self.processor(text=prompts, images=[im.convert("RGB") for im in images], return_tensors="pt",
                                padding=True, truncation=True, max_length=77)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"],
                                               attention_mask=inputs.get("attention_mask"))
            img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        if self.kind == "clipscore":
            return (100 * cos.clamp_min(0)).tolist()
        return (self.model.logit_scale.exp().float() * cos).tolist()


def pickscore(model_name_or_path: str = "yuvalkirstain/PickScore_v1",
              processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **kw: Any) -> ClipScorer:
    """PickScore_v1: logit_scale * cos(image, text), as its model card computes it."""
    return ClipScorer(model_name_or_path, processor_name_or_path, kind="logits", name="pickscore", **kw)


class ImageRewardScorer:
    """ImageReward (pip package `image-reward`, import name `ImageReward`)."""

    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", device: str = "auto"):
        import ImageReward  # noqa: N813 - the package's own name
        import torch

        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model = ImageReward.load(model, device=dev)

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        out = []
        for im, p in zip(images, prompts, strict=True):
            s = self.model.score(p, [im])
            out.append(float(s[0] if isinstance(s, list) else s))
        return out


class HpsV2Scorer:
    """HPS v2 (pip package `hpsv2`)."""

    name = "hpsv2"

    def __init__(self, hps_version: str = "v2.1"):
        import hpsv2

        self._hpsv2, self.hps_version = hpsv2, hps_version

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        return [float(self._hpsv2.score([im], p, hps_version=self.hps_version)[0]) for im, p in zip(images, prompts, strict=True)]


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to render: what is inside its first pair of quotes (else the prompt)."""
    m = re.search(r"[\"“]([^\"”]+)[\"”]", prompt) or re.search(r"'([^']+)'", prompt)
    return (m.group(1) if m else prompt).strip()


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class OcrScorer:
    """OCR accuracy: 1 - min(1, edit_distance(found, target) / len(target)), spaces removed and
    lower-cased, target = the quoted text of the prompt. `reader(image) -> str` is any OCR; the
    default uses easyocr (English)."""

    name = "ocr"

    def __init__(self, reader: Callable[[Image.Image], str] | None = None, languages: Sequence[str] = ("en",)):
        if reader is None:
            import easyocr
            import numpy as np

            r = easyocr.Reader(list(languages))

            def reader(im: Image.Image) -> str:
                return " ".join(r.readtext(np.asarray(im.convert("RGB")), detail=0))

        self.reader = reader

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        out = []
        for im, p in zip(images, prompts, strict=True):
            target = re.sub(r"\s+", "", quoted_text(p).lower())
            found = re.sub(r"\s+", "", self.reader(im).lower())
            out.append(1.0 - min(1.0, _edit_distance(found, target) / max(len(target), 1)))
        return out


# ---------------------------------------------------------------- prompt file -> images -> scores


def write_geneval_layout(
    out_dir: str | Path, rows: list[dict[str, Any]], images: list[Image.Image], images_per_prompt: int
) -> Path:
    """Write images as GenEval expects: `<out>/<i:05d>/metadata.jsonl` (the prompt's row) and
    `<out>/<i:05d>/samples/<k:04d>.png`. Run GenEval's evaluate_images.py on `out_dir` afterwards."""
    out = Path(out_dir)
    for i, row in enumerate(rows):
        d = out / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        (d / "metadata.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
        for k in range(images_per_prompt):
            images[i * images_per_prompt + k].save(d / "samples" / f"{k:04d}.png")
    return out


@dataclass(kw_only=True)
class ExternalEvalConfig:
    """`soar-fast eval --prompts`: sample a prompt file with an SD3 pipeline, score with scorers."""

    pretrained_model_name_or_path: str
    """Local StableDiffusion3Pipeline folder (base or exported)."""
    prompt_file: str
    """.txt (one prompt a line) or .jsonl with a `prompt` key (GenEval's metadata file works)."""
    output_dir: str
    """Where images, results.json (and the GenEval layout) go."""
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    """Scorer names (see SCORERS) or 'module:factory' targets; unavailable ones are skipped."""
    scorer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments per scorer name, e.g. {"clip_score": {"model_name_or_path": "/models/clip"}}."""
    transformer_path: str | None = None
    """Trained transformer (export folder or transformer folder) to use instead of the pipeline's."""
    lora_path: str | None = None
    """LoRA weights written by `save_lora_weights`."""
    num_inference_steps: int = 40
    """Sampler steps (SOAR evaluation: 40)."""
    guidance_scale: float = 4.5
    """CFG scale (SOAR evaluation: 4.5)."""
    height: int | None = None
    """Image height; None: the pipeline default."""
    width: int | None = None
    """Image width; None: the pipeline default."""
    images_per_prompt: int = 1
    """Images per prompt (GenEval uses 4)."""
    batch_size: int = 4
    """Prompts per pipeline call."""
    seed: int = 0
    """Base seed (image k of prompt i uses seed + i * images_per_prompt + k)."""
    max_sequence_length: int = 256
    """T5 tokens per prompt."""
    limit: int | None = None
    """Evaluate only the first `limit` prompts."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Pipeline dtype."""
    save_images: bool = True
    """Save each image under output_dir/images."""
    geneval_layout: bool = False
    """Also write output_dir/geneval in the layout GenEval's evaluate_images.py reads."""
    score_batch_size: int = 16
    """Images per scorer call."""


def run_external_eval(cfg: ExternalEvalConfig, pipe=None, scorers: Sequence[Scorer] | None = None) -> dict[str, Any]:
    """Sample the prompt file and score the images; writes and returns `results.json`'s content:
    {"scores": {name: {"mean", "per_image"}}, "skipped": {name: reason}, "prompts", "images",
    "config"}. `pipe` / `scorers` may be given to reuse loaded ones (then `cfg.scorers` is ignored)."""
    from soar_fast.models.pipeline import load_pipeline
    from soar_fast.models.sampling import SampleConfig, read_prompts, sample_images

    rows = read_prompts(cfg.prompt_file)[: cfg.limit]
    prompts = [r["prompt"] for r in rows]
    skipped: dict[str, str] = {}
    if scorers is None:
        scorers, skipped = load_scorers(cfg.scorers, cfg.scorer_options)
    if pipe is None:
        pipe = load_pipeline(cfg.pretrained_model_name_or_path, transformer_path=cfg.transformer_path,
                                 lora_path=cfg.lora_path, device=cfg.device, dtype=cfg.dtype)
    pipe.set_progress_bar_config(disable=True)
    scfg = SampleConfig(
        pretrained_model_name_or_path=cfg.pretrained_model_name_or_path, output_dir=cfg.output_dir,
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, height=cfg.height,
        width=cfg.width, images_per_prompt=cfg.images_per_prompt, batch_size=cfg.batch_size, seed=cfg.seed,
        max_sequence_length=cfg.max_sequence_length,
    )
    images = sample_images(pipe, prompts, scfg)
    per_image_prompts = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if cfg.save_images:
        (out / "images").mkdir(exist_ok=True)
        for idx, im in enumerate(images):
            p = out / "images" / f"{idx // cfg.images_per_prompt:05d}_{idx % cfg.images_per_prompt}.png"
            im.save(p)
            paths.append(str(p))
    if cfg.geneval_layout:
        write_geneval_layout(out / "geneval", rows, images, cfg.images_per_prompt)
    result = {
        "scores": score_images(scorers, images, per_image_prompts, cfg.score_batch_size),
        "skipped": skipped,
        "prompts": per_image_prompts,
        "images": paths,
        "config": asdict(cfg),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    for name, s in result["scores"].items():
        log.info("%s: %.4f over %d images", name, s["mean"], len(s["per_image"]))
    return result
