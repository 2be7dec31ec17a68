"""`soar-fast sample --pipeline`: prompts through a local pipeline folder of any family (with a trained
transformer or LoRA) -> PNGs and a grid; videos (Wan) as GIF / MP4 and a grid of first frames; FLUX.1
Kontext edits an `--image`.

- `SampleConfig` + `run_sample(cfg)`: the command; `sample_images(pipe, prompts, cfg)` the generation.
- `read_prompts(path)`: a .txt or .jsonl prompt file; `make_grid(images)`: one image of them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from soar_fast.config import ConfigError
from soar_fast.config.sd35 import KONTEXT_PIPELINE, PIPELINE_FAMILIES
from soar_fast.models.pipeline import load_pipeline

__all__ = ["SampleConfig", "SampleResult", "make_grid", "read_prompts", "run_sample", "sample_images"]

log = logging.getLogger(__name__)


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts from a file: `.txt` (one per line; blank lines and `#` comments skipped) or `.jsonl`
    (objects with a `prompt` key, e.g. GenEval's evaluation_metadata.jsonl; other keys are kept as
    metadata for scorers). Returns dicts with at least `prompt`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} not found")
    rows: list[dict[str, Any]] = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or "prompt" not in row:
                    raise ValueError(f"{p}:{i}: need a JSON object with a 'prompt' key")
                rows.append(row)
    else:
        rows = [{"prompt": s.strip()} for s in p.read_text(encoding="utf-8").splitlines()
                if s.strip() and not s.lstrip().startswith("#")]
    if not rows:
        raise ValueError(f"prompt file {p} holds no prompts")
    return rows


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (all of one size) row by row; `cols` defaults to ceil(sqrt(n))."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


@dataclass(kw_only=True)
class SampleConfig:
    """Inputs and settings of `soar-fast sample`."""

    pretrained_model_name_or_path: str
    """Local pipeline folder (StableDiffusion3Pipeline, FluxPipeline, ZImagePipeline, QwenImagePipeline,
    Flux2Pipeline or WanPipeline), a base checkpoint or an exported one."""
    output_dir: str
    """Where the PNGs, grid.png and prompts.json go."""
    prompts: list[str] = field(default_factory=list)
    """Prompts given inline; used with or instead of `prompt_file`."""
    prompt_file: str | None = None
    """A .txt (one prompt a line) or .jsonl (`prompt` key) file."""
    transformer_path: str | None = None
    """Trained transformer to use instead of the pipeline's (export folder or transformer folder)."""
    lora_path: str | None = None
    """LoRA folder/file written by `save_lora_weights`."""
    lora_scale: float = 1.0
    """Adapter weight of the LoRA."""
    num_inference_steps: int = 40
    """Sampler steps (the SOAR evaluation setting)."""
    guidance_scale: float = 4.5
    """Classifier-free guidance (the SOAR evaluation setting), as the family's pipeline takes it: SD3
    `guidance_scale`; Qwen-Image `true_cfg_scale` (against `negative_prompt`); Z-Image its
    `guidance_scale` g, whose `pos + g·(pos - neg)` is SOAR's scale g + 1 (Turbo samples at 0);
    FLUX.1-dev / FLUX.2-dev the distilled-guidance embedding (3.5 / 4.0 there), not CFG."""
    height: int | None = None
    """Image height; None uses the transformer's default (sample_size x VAE factor)."""
    width: int | None = None
    """Image width; None as height."""
    images_per_prompt: int = 1
    """Images per prompt (seeds seed, seed + 1, ... per prompt)."""
    batch_size: int = 4
    """Prompts per pipeline call."""
    seed: int = 0
    """Base seed; image k of prompt i uses seed + i * images_per_prompt + k, whatever the batching."""
    max_sequence_length: int = 256
    """Text tokens per prompt."""
    negative_prompt: str = ""
    """Negative prompt of CFG (SOAR's uncond is the empty prompt); SD3, Z-Image and Qwen-Image."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Pipeline dtype; 'auto' is bfloat16 on CUDA, float32 on CPU."""
    grid_cols: int | None = None
    """Grid columns; None: images_per_prompt if > 1, else ceil(sqrt(n))."""
    save_images: bool = True
    """Also save each image as NNNNN_K.png (a video: NNNNN_K.gif, and NNNNN_K.mp4 where PyAV is installed)."""
    image: str | None = None
    """The input image every prompt edits (FLUX.1 Kontext pipelines: FluxKontextPipeline's `image`). Without
    --height/--width the pipeline picks the size (its preferred resolutions, 1024² area); with both, the output
    has that area and the input image keeps its own size."""
    num_frames: int = 81
    """Frames of each video (video pipelines: Wan; 4k + 1, WanPipeline's default 81)."""
    fps: int = 16
    """Frame rate of the written videos (Wan 2.1's 16)."""

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "images_per_prompt", "batch_size", "max_sequence_length", "fps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SampleConfig.{name}={getattr(self, name)} is invalid: need >= 1")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError(f"SampleConfig.num_frames={self.num_frames} is invalid: Wan's VAE takes 4k + 1 frames "
                              "(e.g. 81, 49, 5)")
        if self.guidance_scale < 0:
            raise ConfigError(f"SampleConfig.guidance_scale={self.guidance_scale} is invalid: need >= 0")


@dataclass
class SampleResult:
    """Paths written by `run_sample`, and the images (prompt-major)."""

    grid_path: Path
    image_paths: list[Path]
    prompts: list[str]
    images: list[Image.Image]
    """Each image; for a video pipeline each video's first frame (the grid's cells)."""
    videos: list[list[Image.Image]] = field(default_factory=list)
    """The frames of each video (video pipelines only), prompt-major as `images`."""


def _guidance_kwargs(pipe, cfg: SampleConfig, n: int) -> dict[str, Any]:
    """The guidance arguments of the pipeline's family for `cfg.guidance_scale` (see its docstring)."""
    family = next((f for f, names in PIPELINE_FAMILIES.items() if type(pipe).__name__ in names), "sd3")
    negative = {"negative_prompt": [cfg.negative_prompt] * n}
    if family == "qwenimage":  # not guidance-distilled: true CFG; guidance_scale is for distilled checkpoints
        return {"true_cfg_scale": cfg.guidance_scale, "guidance_scale": None, **negative}
    if family in ("sd3", "zimage", "wan"):  # Wan 2.2's low-noise expert takes the same scale (guidance_scale_2=None)
        return {"guidance_scale": cfg.guidance_scale, **negative}
    return {"guidance_scale": cfg.guidance_scale}


def _is_video(pipe) -> bool:
    return type(pipe).__name__ in PIPELINE_FAMILIES["wan"]


def sample_images(pipe, prompts: list[str], cfg: SampleConfig) -> list[Image.Image] | list[list[Image.Image]]:
    """Images for `prompts` (prompt-major, `images_per_prompt` each), one generator per image so
    the result does not depend on `batch_size`; a video pipeline gives each video's frames."""
    dev = pipe._execution_device
    images: list = []
    k = cfg.images_per_prompt
    video = _is_video(pipe)
    image = _input_image(pipe, cfg)
    for s in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[s : s + cfg.batch_size]
        gens = [torch.Generator(device=dev).manual_seed(cfg.seed + (s + i) * k + j)
                for i in range(len(chunk)) for j in range(k)]
        args: dict[str, Any] = dict(prompt=chunk, num_inference_steps=cfg.num_inference_steps, generator=gens,
                                    max_sequence_length=cfg.max_sequence_length, output_type="pil",
                                    **_guidance_kwargs(pipe, cfg, len(chunk)))
        if video:  # WanPipeline: num_videos_per_prompt, num_frames; its own 480 x 832 unless a size is given
            size = {n: v for n, v in (("height", cfg.height), ("width", cfg.width)) if v is not None}
            images += list(pipe(**args, num_videos_per_prompt=k, num_frames=cfg.num_frames, **size).frames)
        else:
            extra = {"image": image} if image is not None else {}
            if image is not None and cfg.height and cfg.width:  # Kontext sizes its output by max_area, not
                # height/width, and resizes the input to its preferred resolutions: honour the size asked for
                extra.update(max_area=cfg.height * cfg.width, _auto_resize=False)
            images += pipe(**args, num_images_per_prompt=k, height=cfg.height, width=cfg.width, **extra).images
    return images


def _input_image(pipe, cfg: SampleConfig) -> Image.Image | None:
    """The `--image` of an image-conditioned pipeline (FLUX.1 Kontext), RGB; one-line errors when it is missing
    for one, or given to a text-to-image pipeline."""
    kontext = type(pipe).__name__ == KONTEXT_PIPELINE
    if not kontext:
        if cfg.image:
            raise ConfigError(f"--image is for FLUX.1 Kontext pipelines, not a {type(pipe).__name__}; drop it")
        return None
    if not cfg.image or not Path(cfg.image).is_file():
        raise ConfigError("a FLUX.1 Kontext pipeline edits an input image: pass --image <file>"
                          + (f" ({cfg.image} is not a file)" if cfg.image else ""))
    with Image.open(cfg.image) as im:
        return im.convert("RGB")


def _save_video(frames: list[Image.Image], path: Path, fps: int) -> list[Path]:
    """An animated GIF (PIL), and an H.264 MP4 where PyAV is installed (`soar-fast[video]`)."""
    frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0)
    out = [path.with_suffix(".gif")]
    try:
        import av
    except ImportError:
        return out
    w, h = (d - d % 2 for d in frames[0].size)  # yuv420p takes even sizes: crop a last odd row/column
    with av.open(str(path.with_suffix(".mp4")), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for im in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(im.convert("RGB").crop((0, 0, w, h)))))
        container.mux(stream.encode())
    return [*out, path.with_suffix(".mp4")]


def run_sample(cfg: SampleConfig, pipe=None) -> SampleResult:
    """Generate images for the prompts of `cfg` and write them plus `grid.png` to `cfg.output_dir`.

    `pipe` may be passed to reuse a loaded pipeline (then the model paths of `cfg` are ignored).
    """
    prompts = list(cfg.prompts)
    if cfg.prompt_file:
        prompts += [r["prompt"] for r in read_prompts(cfg.prompt_file)]
    if not prompts:
        raise ConfigError("SampleConfig: no prompts; set prompts=[...] or prompt_file=<file>")
    if pipe is None:
        pipe = load_pipeline(
            cfg.pretrained_model_name_or_path, transformer_path=cfg.transformer_path, lora_path=cfg.lora_path,
            lora_scale=cfg.lora_scale, device=cfg.device, dtype=cfg.dtype,
        )
    pipe.set_progress_bar_config(disable=True)
    images = sample_images(pipe, prompts, cfg)
    videos = images if _is_video(pipe) else []
    if videos:
        images = [v[0] for v in videos]  # the grid shows each video's first frame
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if cfg.save_images:
        for idx, im in enumerate(images):
            p = out / f"{idx // cfg.images_per_prompt:05d}_{idx % cfg.images_per_prompt}.png"
            if videos:
                paths += _save_video(videos[idx], p, cfg.fps)
            else:
                im.save(p)
                paths.append(p)
    cols = cfg.grid_cols or (cfg.images_per_prompt if cfg.images_per_prompt > 1 else None)
    grid_path = out / "grid.png"
    make_grid(images, cols).save(grid_path)
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1), encoding="utf-8")
    log.info("wrote %d %s and %s", len(images), "videos" if videos else "images", grid_path)
    return SampleResult(grid_path=grid_path, image_paths=paths, prompts=prompts, images=images, videos=videos)
