"""Wan 2.1 video end to end through `soar-fast` commands, on a tiny WanPipeline built locally (umT5
and a T5 tokenizer from in-test vocabularies, a tiny AutoencoderKLWan): a folder of clips (frame
subfolders with sidecar captions) -> `soar-fast cache` (latents `(vae - mean) / std` [C, f, h, w],
umT5 embeddings zero-padded to max_sequence_length, as WanPipeline feeds them) -> `soar-fast train`
SOAR 2 steps (full and LoRA) -> WanPipeline loads the export (final/ pipeline folder,
load_lora_weights) and generates a few frames. Bad input: images given to a Wan pipeline, clips too
short, a frame count Wan's VAE cannot take: one line each."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json

import torch
from family_pipelines import FAST_TRAIN, run_ok
from safetensors.torch import load_file
from sd35_helpers import tiny_vocabs, write_image

from soar_fast.cli import main

L = 16  # max_sequence_length of the tiny runs
FRAMES = 5  # 4k + 1: two latent frames
SAMPLE = ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
          "--max_sequence_length", str(L), "--guidance_scale", "2.0"]


def build_tiny_wan_pipeline(seed: int = 0):
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    _, t5_vocab = tiny_vocabs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(t5_vocab), d_model=32, d_kv=8, d_ff=37,
                                                   num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
                                                   decoder_start_token_id=0))
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                            in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                            num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                            rope_max_seq_len=32)
    return WanPipeline(tokenizer=T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=512),
                       text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer)


def _clips(root, n=4, frames=FRAMES):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        clip = root / f"clip{i}"
        clip.mkdir()
        for k in range(frames):
            write_image(clip / f"{k:03d}.png", seed=10 * i + k)
        (root / f"clip{i}.txt").write_text(f"a moving shape number {i}", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_wan")
    build_tiny_wan_pipeline().save_pretrained(path)
    return path


def _cache_argv(pipe_dir, clips, out, *extra):
    return ["cache", "--pretrained_model_name_or_path", str(pipe_dir), "--data.root", str(clips),
            "--data.resolution", "32", "--output_dir", str(out), "--max_sequence_length", str(L),
            "--batch_size", "2", "--shard_size", "4", "--num_workers", "0", "--no-progress",
            "--store_dtype", "float32", "--num_frames", str(FRAMES), *extra]


@pytest.fixture(scope="module")
def wan_cache(wan_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_cache")
    run_ok(_cache_argv(wan_dir, _clips(root / "clips"), root / "cache"))
    return root / "cache"


def test_cache_is_what_wan_pipeline_feeds(wan_cache, wan_dir):
    from diffusers import WanPipeline

    index = json.loads((wan_cache / "index.json").read_text())
    assert index["info"]["family"] == "wan" and index["info"]["num_frames"] == FRAMES
    shard = load_file(str(wan_cache / index["shards"][0]["file"]))
    assert shard["latents"].shape == (4, 16, 2, 4, 4)  # [N, C, 1 + (F - 1) / 4, H / 8, W / 8]
    assert shard["prompt_embeds"].shape == (4, L, 32) and shard["pooled"].shape == (4, 0)
    pipe = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    ref, _ = pipe.encode_prompt(["a moving shape number 0"], do_classifier_free_guidance=False, max_sequence_length=L)
    torch.testing.assert_close(shard["prompt_embeds"][0], ref[0])
    # the latents are what WanPipeline's decode inverts (x = z * std + mean)
    from soar_fast.data.images import ImageRecord
    from soar_fast.data.video import load_clip

    px = load_clip(ImageRecord(str(wan_cache.parent / "clips" / "clip0"), "", (32, 32), (32, 32)), FRAMES, center_crop=True)
    lat = pipe.vae.encode(px[None]).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(shard["latents"][0], ((lat - mean) / std)[0], rtol=1e-4, atol=1e-5)


def test_full_and_lora_train_export_sample(wan_dir, wan_cache, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    folder = ["--recipe", "tiny-wan", "--pretrained_model_name_or_path", str(wan_dir), "--data.source", "latents",
              "--data.data_dir", str(wan_cache)]
    run_ok(["train", *folder, "--output_dir", str(tmp_path / "full"), *FAST_TRAIN])
    final = tmp_path / "full" / "final"
    trained = WanTransformer3DModel.from_pretrained(final / "transformer")
    base = WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    pipe = WanPipeline.from_pretrained(final, local_files_only=True)  # the export is a pipeline folder
    out = pipe("a moving shape", num_frames=FRAMES, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
               max_sequence_length=L, output_type="pt").frames
    assert out.shape == (1, FRAMES, 3, 32, 32) and torch.isfinite(out).all()

    run_ok(["train", *folder, "--model.lora_rank", "4", "--output_dir", str(tmp_path / "lora"), *FAST_TRAIN])
    lora = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    lora.load_lora_weights(tmp_path / "lora" / "final")
    assert any("lora" in n for n, _ in lora.transformer.named_parameters())
    out = lora("a moving shape", num_frames=FRAMES, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
               max_sequence_length=L, output_type="pt").frames
    assert out.shape == (1, FRAMES, 3, 32, 32)

    # `soar-fast sample` on video pipelines: a GIF of FRAMES frames per video and a grid of first frames
    for name, extra in (("full", ["--pipeline", str(final)]),
                        ("lora", ["--pipeline", str(wan_dir), "--lora", str(tmp_path / "lora" / "final")])):
        _sample_ok(extra, tmp_path / f"samples_{name}", videos=2)


def _sample_ok(flags, out, videos):
    from PIL import Image

    run_ok(["sample", *flags, "--prompts", "a moving shape", "a still shape", "--output_dir", str(out),
            "--num_frames", str(FRAMES), *SAMPLE])
    gifs = sorted(out.glob("*.gif"))
    assert len(gifs) == videos and (out / "grid.png").is_file()
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == FRAMES and gif.size == (32, 32)
    try:
        import av
    except ImportError:
        return
    mp4s = sorted(out.glob("*.mp4"))  # PyAV installed: an H.264 MP4 beside each GIF, all its frames
    assert len(mp4s) == videos
    with av.open(str(mp4s[0])) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == FRAMES and c.streams.video[0].width == 32


def test_cache_of_video_files_at_a_frame_stride(wan_dir, tmp_path):
    """.mp4 clips (PyAV) with captions beside them cache under `--frame_stride 2` (index.json records it)
    to the latents of frame folders holding exactly frames 0, 2, 4, ..."""
    av = pytest.importorskip("av")
    import numpy as np
    from PIL import Image

    mp4s, folders = tmp_path / "mp4", tmp_path / "folders"
    mp4s.mkdir()
    for i in range(2):  # frame k a flat gray of level 25 k + 10 (+ i), as a frame folder and as an MP4
        (folders / f"clip{i}").mkdir(parents=True)
        (folders / f"clip{i}.txt").write_text(f"a moving shape number {i}", encoding="utf-8")
        for k in range(2 * FRAMES - 1):
            Image.fromarray(np.full((32, 32, 3), 25 * k + 10 + i, np.uint8)).save(folders / f"clip{i}" / f"{k:03d}.png")
        frames = sorted((folders / f"clip{i}").glob("*.png"))
        with av.open(str(mp4s / f"clip{i}.mp4"), mode="w") as c:
            st = c.add_stream("mpeg4", rate=16, options={"qscale": "1"})
            st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
            for f in frames:
                c.mux(st.encode(av.VideoFrame.from_image(Image.open(f).convert("RGB"))))
            c.mux(st.encode())
        (mp4s / f"clip{i}.txt").write_text(f"a moving shape number {i}", encoding="utf-8")
        for k, f in enumerate(frames):  # keep only the strided frames in the folder version
            if k % 2:
                f.unlink()
    run_ok(_cache_argv(wan_dir, mp4s, tmp_path / "c_mp4", "--frame_stride", "2"))
    run_ok(_cache_argv(wan_dir, folders, tmp_path / "c_dir"))
    index = json.loads((tmp_path / "c_mp4" / "index.json").read_text())
    assert index["info"]["frame_stride"] == 2 and index["num_samples"] == 2
    a = load_file(str(tmp_path / "c_mp4" / index["shards"][0]["file"]))["latents"]
    b_index = json.loads((tmp_path / "c_dir" / "index.json").read_text())
    b = load_file(str(tmp_path / "c_dir" / b_index["shards"][0]["file"]))["latents"]
    assert a.shape == b.shape == (2, 16, 2, 4, 4)
    # equal up to the codec's loss; the tiny random VAE hardly tells frames apart, so which frames a stride
    # reads is checked on pixels (tests/data/test_video_files.py): here the command path of video files
    assert (a - b).abs().mean() < 0.1 * b.abs().mean()


def test_aspect_buckets_of_clips_cache_and_train(wan_dir, tmp_path):
    """`--data.aspect_buckets` buckets clips by their first frame's aspect ratio as it does images: a
    landscape and a portrait pair cache into shards of two latent shapes, and SOAR trains on them."""
    from soar_fast.data.latents import LatentsDataset

    clips = tmp_path / "clips"
    for i, size in enumerate([(64, 32), (64, 32), (32, 64), (32, 64)]):  # (width, height)
        (clips / f"clip{i}").mkdir(parents=True)
        for k in range(FRAMES):
            write_image(clips / f"clip{i}" / f"{k:03d}.png", size=size, seed=10 * i + k)
        (clips / f"clip{i}.txt").write_text(f"a moving shape number {i}", encoding="utf-8")
    argv = _cache_argv(wan_dir, clips, tmp_path / "cache")
    argv[argv.index("--data.resolution") + 1] = "48"
    run_ok([*argv, "--data.aspect_buckets", "--data.bucket_step", "16"])
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert [tuple(b) for b in index["info"]["buckets"]] == [(64, 32), (48, 48), (32, 64)]
    shapes = sorted(tuple(load_file(str(tmp_path / "cache" / s["file"]))["latents"].shape) for s in index["shards"])
    assert shapes == [(2, 16, 2, 4, 8), (2, 16, 2, 8, 4)]  # [N, C, f, H / 8, W / 8] per bucket
    assert len(LatentsDataset(str(tmp_path / "cache"))) == 4
    run_ok(["train", "--recipe", "tiny-wan", "--pretrained_model_name_or_path", str(wan_dir), "--data.source",
            "latents", "--data.data_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"), *FAST_TRAIN])
    assert (tmp_path / "run" / "final" / "transformer").is_dir()


def test_bad_video_input_is_one_line(wan_dir, tiny_sd3_dir, caption_folder, tmp_path, capsys):
    def bad(argv, *needles):
        rc = main(argv)
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
        assert rc == 2 and len(err) == 1 and all(n in err[0] for n in needles), (rc, err)

    bad(_cache_argv(wan_dir, caption_folder, tmp_path / "c1"), "no clips found", "a Wan pipeline caches videos")
    bad(_cache_argv(wan_dir, _clips(tmp_path / "short", n=2, frames=3), tmp_path / "c2"), "no usable clips",
        "fewer than --num_frames 5")
    bad([*_cache_argv(wan_dir, tmp_path / "short", tmp_path / "c3")[:-2], "--num_frames", "6"], "num_frames", "4k + 1")
    bad(_cache_argv(tiny_sd3_dir, tmp_path / "short", tmp_path / "c4")[:-2], "holds video clips",
        "cache the clips with a Wan pipeline")


def test_validation_grids_of_a_video_cache(wan_dir, tmp_path):
    """`--validation_prompts` on a Wan cache; `--validation_steps 1` samples through the Wan
    velocity and decodes with AutoencoderKLWan, the grid showing each video's first frame."""
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue sky\n", encoding="utf-8")
    run_ok(_cache_argv(wan_dir, _clips(tmp_path / "clips"), tmp_path / "cache", "--validation_prompts", str(prompts)))
    run_ok(["train", "--recipe", "tiny-wan", "--pretrained_model_name_or_path", str(wan_dir), "--data.source",
            "latents", "--data.data_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"), *FAST_TRAIN,
            "--validation_steps", "1", "--logging.validation_inference_steps", "2",
            "--logging.validation_images_per_class", "1"])
    grids = sorted((tmp_path / "run" / "samples").glob("step-*.png"))
    assert [g.name for g in grids][:2] == ["step-000001.png", "step-000002.png"], grids
    img = np.asarray(Image.open(grids[-1]).convert("RGB"))
    assert img.shape[1] >= 2 * 32 and img.std() > 0


def test_plan_reads_a_video_caches_shape(wan_dir, wan_cache, capsys):
    """`soar-fast plan` on a clip cache plans its video latents [16, 2, 4, 4] (2 x 2 x 2 = 8 tokens
    after the (1, 2, 2) patch), not an image of its width."""
    assert main(["plan", "--recipe", "tiny-wan", "--pretrained_model_name_or_path", str(wan_dir),
                 "--data.source", "latents", "--data.data_dir", str(wan_cache)]) == 0
    out = capsys.readouterr().out
    assert " 8 tokens per sample" in out and "no readable latent cache" not in out


def test_wan22_lora_of_both_experts_samples(wan_dir, wan_cache, tmp_path):
    """A Wan 2.2 folder (the tiny pipeline plus a second expert, boundary 0.75) trains LoRA on both
    experts; `sample --lora final` loads the low-noise expert's adapters from final/transformer_2/
    into transformer_2 (and the high one's into transformer) and writes the videos."""
    from diffusers import WanPipeline

    from soar_fast.models.pipeline import load_pipeline
    from soar_fast.models.spec import get_family

    base = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    second = get_family("wan").cls().from_config(base.transformer.config)
    wan22 = tmp_path / "wan22"
    WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                transformer=base.transformer, transformer_2=second, boundary_ratio=0.75).save_pretrained(wan22)
    run_ok(["train", "--recipe", "tiny-wan", "--pretrained_model_name_or_path", str(wan22), "--data.source",
            "latents", "--data.data_dir", str(wan_cache), "--model.lora_rank", "4", "--output_dir",
            str(tmp_path / "run"), *FAST_TRAIN])
    lora = tmp_path / "run" / "final"
    pipe = load_pipeline(wan22, lora_path=lora, device="cpu")
    for expert in (pipe.transformer, pipe.transformer_2):
        assert any("lora" in n for n, _ in expert.named_parameters())
    _sample_ok(["--pipeline", str(wan22), "--lora", str(lora)], tmp_path / "samples", videos=2)


def test_sample_refuses_a_frame_count_wan_cannot_take(wan_dir, tmp_path, capsys):
    rc = main(["sample", "--pipeline", str(wan_dir), "--prompts", "x", "--output_dir", str(tmp_path / "s"),
               "--num_frames", "6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "num_frames" in err[0] and "4k + 1" in err[0], err
