"""Tiny random pipelines of the newer families (Z-Image, Qwen-Image, FLUX.2), built locally: the
tokenizers from in-test vocabularies, random text encoders and VAEs (no hub access). Component
sizes follow diffusers' own pipeline tests (tests/pipelines/{z_image,qwenimage,flux2}), smaller
where they can be. A module of its own (not conftest) so test modules import it by name.

Also the end-to-end skeleton the three family tests (test_{zimage,qwenimage,flux2}_e2e.py) share:
`soar-fast cache` of a pipeline folder, the full + LoRA train -> export -> sample run, and the
error lines of a train on another family's cache (conftest.py registers this module for pytest's
assertion rewriting, so its asserts report as a test module's do)."""

from __future__ import annotations

import torch

# A chat template of the Qwen family's form (<|im_start|>role ... <|im_end|>); the pipelines only
# need apply_chat_template to give a string (Z-Image) or to exist (Qwen-Image formats its own).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_alphabet() -> list[str]:
    """GPT-2's bytes -> printable characters table (the byte-level BPE alphabet of Qwen tokenizers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def qwen_tokenizer():
    """A Qwen2Tokenizer over the 256 byte-level characters (no merges: one token a byte) plus the
    Qwen special tokens, with a chat template. 259 tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_level_alphabet())}
    for s in QWEN_SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=QWEN_SPECIALS[1:])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_tiny_zimage_pipeline(seed: int = 0):
    """A tiny random ZImagePipeline: the family's tiny transformer preset (16 latent channels,
    cap_feat_dim 32), a 2-layer Qwen3 text encoder of width 32, a 4x-downsampling VAE (32 px ->
    16 x 8 x 8 latents, Z-Image's shift and scaling factors)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    from soar_fast.models.spec import get_family

    tok = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = get_family("zimage").build("tiny", seed=seed)
        with torch.no_grad():  # nonzero pad tokens (zeros at init), as diffusers' test does
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        text_encoder = Qwen3Model(Qwen3Config(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            head_dim=16, vocab_size=len(tok), max_position_embeddings=512,
        ))
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4, 4),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, latent_channels=16, norm_num_groups=1, use_quant_conv=False,
            use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
        )
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tok, transformer=transformer)


def build_tiny_qwenimage_pipeline(seed: int = 0):
    """A tiny random QwenImagePipeline: a 1-block transformer on 16 latent channels (in_channels 64
    after 2x2 packing, text width 16), a 2-layer Qwen2.5-VL text encoder of width 16 (vision tower
    of depth 1, unused by text-only prompts), and an AutoencoderKLQwenImage with z_dim 16, 4x
    spatial downsampling (32 px -> 16 x 8 x 8) and nontrivial per-channel latents_mean / std."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "num_key_value_heads": 2, "vocab_size": len(tok), "bos_token_id": 256, "eos_token_id": 258,
                         "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         "rope_theta": 1000000.0},
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                           "out_hidden_size": 16},
            hidden_size=16, vocab_size=len(tok), bos_token_id=256, eos_token_id=258, vision_start_token_id=len(tok) + 1,
            vision_end_token_id=len(tok) + 2, vision_token_id=len(tok) + 3, image_token_id=len(tok) + 4,
            video_token_id=len(tok) + 5,
        )).eval()
        g = torch.Generator().manual_seed(seed)
        vae = AutoencoderKLQwenImage(
            base_dim=16, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=(torch.randn(16, generator=g) * 0.1).tolist(),
            latents_std=(1 + torch.rand(16, generator=g)).tolist(),
        )
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tok, transformer=transformer)


# Mistral's chat form ([SYSTEM_PROMPT] ... [INST] ... [/INST]) over Flux2Pipeline's messages, whose
# content is a list of {"type": "text", "text": ...} parts.
MISTRAL_SPECIALS = ["<pad>", "<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]
MISTRAL_CHAT_TEMPLATE = (
    "<s>{% for m in messages %}{% set text = m['content'] | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}[INST]{{ text }}[/INST]"
    "{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """A byte-level BPE tokenizer (the Qwen2Tokenizer class, no merges) with Mistral's special tokens
    and a Mistral-form chat template: what Flux2Pipeline's `tokenizer.apply_chat_template` needs."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_level_alphabet())}
    for s in MISTRAL_SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<pad>", bos_token="<s>", eos_token="</s>",
                         pad_token="<pad>", additional_special_tokens=MISTRAL_SPECIALS[3:])
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def build_tiny_flux2_pipeline(seed: int = 0):
    """A tiny random Flux2Pipeline: the family's tiny transformer preset (16 channels = 4 VAE channels
    x 2x2 patches, guidance-distilled) with text width 48, a Mistral-3 text encoder of width 16 and
    30 layers (the pipeline stacks hidden states 10, 20 and 30: 3 x 16 = 48), and an
    AutoencoderKLFlux2 with 4x downsampling (32 px -> 4 x 8 x 8 -> 16 x 4 x 4) whose batch-norm
    statistics are set to nontrivial values."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from soar_fast.models.spec import get_family

    tok = mistral_tokenizer()
    pad, bos, eos = (tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = get_family("flux2").build("tiny", seed=seed, joint_attention_dim=48)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 37,
                         "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 30,
                         "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
                         "sliding_window": None, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad},
            vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                           "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3},
            bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, image_seq_length=4, vision_feature_layer=-1,
            image_token_index=len(tok),
        ))
        vae = AutoencoderKLFlux2(
            sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(4, 4, 4), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        )
        with torch.no_grad():
            vae.bn.running_mean.normal_(0, 0.1)
            vae.bn.running_var.uniform_(0.5, 2.0)
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                         tokenizer=tok, transformer=transformer)



def build_tiny_flux2_klein_pipeline(seed: int = 0):
    """A tiny random Flux2KleinPipeline: the FLUX.2 tiny transformer preset without the guidance
    embedding (klein samples with true CFG), text width 48, a Qwen3 causal LM of width 16 and 27
    layers (the pipeline stacks hidden states 9, 18 and 27: 3 x 16 = 48), the byte-level Qwen
    tokenizer, and the same AutoencoderKLFlux2 as `build_tiny_flux2_pipeline`."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from soar_fast.models.spec import get_family

    base = build_tiny_flux2_pipeline(seed)
    tok = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = get_family("flux2").build("tiny", seed=seed, joint_attention_dim=48, guidance_embeds=False)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            hidden_size=16, intermediate_size=37, num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, vocab_size=len(tok), max_position_embeddings=512,
        ))
    return Flux2KleinPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer)

# --- the end-to-end skeleton of the family tests -----------------------------------------------

# `soar-fast train` flags of the tiny runs: 2 SOAR steps on CPU in fp32, no logging or checkpoints.
FAST_TRAIN = ["--train_batch_size", "2", "--soar.num_aux", "1", "--soar.rollout_steps", "2", "--report_to", "none",
              "--logging.no-progress_bar", "--runtime.device", "cpu", "--mixed_precision", "no", "--max_train_steps",
              "2", "--checkpointing_steps", "0", "--learning_rate", "1e-3"]


def sample_flags(max_sequence_length: int, guidance_scale: float) -> list[str]:
    """`soar-fast sample` flags of the tiny runs: 2 steps of 32 px on CPU."""
    return ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
            "--max_sequence_length", str(max_sequence_length), "--guidance_scale", str(guidance_scale)]


def run_ok(argv: list[str]) -> None:
    """A `soar-fast` command that must succeed."""
    from soar_fast.cli import main

    assert main(argv) == 0, argv


def cache_with_cli(pipe_dir, caption_folder, out, max_sequence_length: int):
    """`soar-fast cache` of the caption folder with the pipeline folder into `out` (fp32 shards of 4)."""
    run_ok(["cache", "--pretrained_model_name_or_path", str(pipe_dir), "--data.root", str(caption_folder),
            "--data.resolution", "32", "--output_dir", str(out), "--max_sequence_length", str(max_sequence_length),
            "--batch_size", "4", "--shard_size", "4", "--num_workers", "0", "--no-progress", "--store_dtype", "float32"])
    return out


def probe_velocity(velocity_fn_cls, transformer, latent_shape, text_shape):
    """The family's velocity function of `transformer` on fixed random latents (t = 0.6) and text,
    no pooled embedding: equal outputs mean equal weights, for comparing an export with its model."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return velocity_fn_cls(transformer)(torch.randn(*latent_shape, generator=g), torch.tensor([0.6]),
                                            (torch.randn(*text_shape, generator=g), torch.zeros(1, 0)))


def check_full_and_lora_train_export_sample(recipe: str, pipe_dir, cache_dir, tmp_path, pipeline_cls, transformer_cls,
                                            probe, sample: list[str]) -> None:
    """Train `recipe` 2 steps on the cache (full, then LoRA rank 4) and check the exports: the trained
    transformer moved; `pipeline_cls` loads final/ as a pipeline folder with the trained weights;
    `sample --pipeline final` and `sample --pipeline <base> --transformer final/transformer` write the
    same two 32 px images and a grid; the LoRA adapters load with `load_lora_weights`, change the
    output, and `sample --lora` writes two images. `probe(transformer)` is the family's velocity probe."""
    from PIL import Image

    folder = ["--recipe", recipe, "--pretrained_model_name_or_path", str(pipe_dir),
              "--data.source", "latents", "--data.data_dir", str(cache_dir)]
    run_ok(["train", *folder, "--output_dir", str(tmp_path / "full"), *FAST_TRAIN])
    final = tmp_path / "full" / "final"
    trained = transformer_cls.from_pretrained(final / "transformer")
    base = transformer_cls.from_pretrained(pipe_dir, subfolder="transformer")
    assert (probe(trained) - probe(base)).abs().max() > 1e-5
    pipe = pipeline_cls.from_pretrained(final, local_files_only=True)  # the export is a pipeline folder
    torch.testing.assert_close(probe(pipe.transformer), probe(trained))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue sky\n", encoding="utf-8")
    run_ok(["sample", "--pipeline", str(final), "--prompts", str(prompts), "--output_dir", str(tmp_path / "s1"), *sample])
    run_ok(["sample", "--pipeline", str(pipe_dir), "--transformer", str(final / "transformer"), "--prompts",
            str(prompts), "--output_dir", str(tmp_path / "s2"), *sample])
    for s in ("s1", "s2"):
        ims = sorted((tmp_path / s).glob("0000*_0.png"))
        assert len(ims) == 2 and Image.open(ims[0]).size == (32, 32) and (tmp_path / s / "grid.png").is_file()
    assert (Image.open(tmp_path / "s1" / "00000_0.png").tobytes() == Image.open(tmp_path / "s2" / "00000_0.png").tobytes())

    run_ok(["train", *folder, "--model.lora_rank", "4", "--output_dir", str(tmp_path / "lora"), *FAST_TRAIN])
    lora = pipeline_cls.from_pretrained(pipe_dir, local_files_only=True)
    lora.load_lora_weights(tmp_path / "lora" / "final")
    assert any("lora" in n for n, _ in lora.transformer.named_parameters())
    assert (probe(lora.transformer) - probe(base)).abs().max() > 1e-6
    run_ok(["sample", "--pipeline", str(pipe_dir), "--lora", str(tmp_path / "lora" / "final"), "--prompts",
            str(prompts), "--output_dir", str(tmp_path / "s3"), *sample])
    assert len(list((tmp_path / "s3").glob("0000*_0.png"))) == 2


def train_on_cache_errors(recipe: str, pipe_dir, cache_dir, tmp_path, capsys) -> tuple[int, list[str]]:
    """`soar-fast train` of `recipe` on `cache_dir` (a cache of another family): its exit status and
    the `soar-fast: error:` lines it wrote to stderr."""
    from soar_fast.cli import main

    rc = main(["train", "--recipe", recipe, "--pretrained_model_name_or_path", str(pipe_dir),
               "--data.source", "latents", "--data.data_dir", str(cache_dir), "--output_dir",
               str(tmp_path / "r"), *FAST_TRAIN])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    return rc, err


def check_text_masks(cache_dir) -> None:
    """A zero-padded cache (Z-Image, Qwen-Image) reaches the trainer with each prompt's mask: the
    condition's third tensor is 1.0 on exactly the recorded valid tokens, for the rows, the empty
    prompt and (when cached) the validation prompts."""
    import json
    from pathlib import Path

    from soar_fast.data.latents import LatentsDataset
    from soar_fast.data.shards import ShardDataset

    ds, shards = LatentsDataset(str(cache_dir)), ShardDataset(cache_dir)
    info = json.loads((Path(cache_dir) / "index.json").read_text())["info"]
    assert ds.masked
    _, (pe, pooled, mask), _ = ds.batch(torch.arange(len(ds)))
    assert mask.shape == pe.shape[:2] and mask.dtype == torch.float32
    lengths = [shards.prompt_length(i) for i in range(len(ds))]
    assert mask.sum(1).tolist() == lengths and len(set(lengths)) > 1
    assert all(mask[i, :k].all() and not mask[i, k:].any() for i, k in enumerate(lengths))  # a prefix
    u_pe, _, u_mask = ds.uncond()
    assert u_mask.shape == u_pe.shape[:1] and int(u_mask.sum()) == info["empty_prompt_length"]
    val = ds.validation()
    if val is not None:
        v_pe, _, v_mask = val[1]
        assert v_mask.shape == v_pe.shape[:2] and 0 < v_mask.sum(1).min()
