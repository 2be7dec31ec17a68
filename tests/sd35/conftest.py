"""A tiny random StableDiffusion3Pipeline built locally (no hub access), and a caption folder.

Tokenizers are constructed from an in-test vocabulary (transformers 5 builds CLIPTokenizer and
T5Tokenizer from `vocab`/`merges` directly), the models from tiny configs as diffusers' own SD3
pipeline tests do, then everything is saved with `save_pretrained` and read back offline.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.register_assert_rewrite("family_pipelines")  # its shared e2e checks report as a test's asserts do

import torch  # noqa: E402
from sd35_helpers import CAPTIONS, CHARS, make_caption_folder, tiny_vocabs, write_image  # noqa: E402,F401


def build_tiny_sd3_pipeline(seed: int = 0):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    vocab, t5_vocab = tiny_vocabs()
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    t5_tok = T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=512)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_cfg = CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=37,
            num_attention_heads=2, num_hidden_layers=2, vocab_size=len(vocab), projection_dim=32, hidden_act="gelu",
        )
        te, te2 = CLIPTextModelWithProjection(clip_cfg), CLIPTextModelWithProjection(clip_cfg)
        te3 = T5EncoderModel(T5Config(
            vocab_size=len(t5_vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        ))
        # pooled = 2 x projection_dim = 64; joint = T5 d_model = 32 (CLIP 2 x 16 padded to 32).
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        )
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
        text_encoder_3=te3, tokenizer_3=t5_tok,
    )


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A saved tiny SD3 pipeline folder (32 px images -> 16x16x4 latents)."""
    path = tmp_path_factory.mktemp("tiny_sd3")
    build_tiny_sd3_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory) -> Path:
    """Six 32x32 images with sidecar captions."""
    return make_caption_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tiny_cache(tiny_sd3_dir, caption_folder, tmp_path_factory):
    """The caption folder cached with the tiny pipeline (run once per session)."""
    from soar_fast.data.cache import CacheConfig, run_cache
    from soar_fast.data.images import ImageFolderConfig

    out = tmp_path_factory.mktemp("cache")
    cfg = CacheConfig(
        pretrained_model_name_or_path=str(tiny_sd3_dir), data=ImageFolderConfig(root=str(caption_folder), resolution=32),
        output_dir=str(out), max_sequence_length=16, batch_size=4, shard_size=4, progress=False,
        store_dtype="float32",
    )
    return cfg, run_cache(cfg)


def build_tiny_flux_pipeline(seed: int = 0):
    """A tiny random FluxPipeline (guidance-distilled transformer like Flux-dev), no downloads."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    vocab, t5_vocab = tiny_vocabs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab), hidden_act="gelu",
        ))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        ))
        # joint = T5 d_model = 32, pooled = CLIP hidden = 32, in_channels = 4 latent channels x 2x2 packing.
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
            guidance_embeds=True,
        )
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), text_encoder_2=t5,
        tokenizer_2=T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=512), transformer=transformer,
    )


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_flux")
    build_tiny_flux_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory) -> Path:
    """A saved tiny ZImagePipeline folder (tests/sd35/family_pipelines.py)."""
    from family_pipelines import build_tiny_zimage_pipeline

    path = tmp_path_factory.mktemp("tiny_zimage")
    build_tiny_zimage_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """A saved tiny QwenImagePipeline folder (tests/sd35/family_pipelines.py)."""
    from family_pipelines import build_tiny_qwenimage_pipeline

    path = tmp_path_factory.mktemp("tiny_qwenimage")
    build_tiny_qwenimage_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def flux2_dir(tmp_path_factory) -> Path:
    """A saved tiny Flux2Pipeline folder (tests/sd35/family_pipelines.py)."""
    from family_pipelines import build_tiny_flux2_pipeline

    path = tmp_path_factory.mktemp("tiny_flux2")
    build_tiny_flux2_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def flux2_klein_dir(tmp_path_factory) -> Path:
    """A saved tiny Flux2KleinPipeline folder (tests/sd35/family_pipelines.py)."""
    from family_pipelines import build_tiny_flux2_klein_pipeline

    path = tmp_path_factory.mktemp("tiny_flux2_klein")
    build_tiny_flux2_klein_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_zimage_cache(tiny_zimage_dir, caption_folder, tmp_path_factory) -> Path:
    """The caption folder cached with `soar-fast cache` and the tiny Z-Image pipeline (32 tokens)."""
    from family_pipelines import cache_with_cli

    return cache_with_cli(tiny_zimage_dir, caption_folder, tmp_path_factory.mktemp("zimage_cache") / "cache", 32)
