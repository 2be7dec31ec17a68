"""External scorer interface: a toy scorer, lazy discovery, skipping, the prompt-file eval."""

import pytest
from sd35_helpers import tiny_vocabs

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json

import numpy as np
import torch
from PIL import Image

from soar_fast.config import ConfigError
from soar_fast.eval.external import (
    ClipScorer,
    ExternalEvalConfig,
    OcrScorer,
    Scorer,
    load_scorers,
    register_scorer,
    run_external_eval,
    score_images,
)


class ToyScorer:
    """Mean red channel in [0, 1], plus 1 when the prompt says 'red': depends on image and prompt."""

    name = "toy"

    def __init__(self, bonus: float = 1.0):
        self.bonus = bonus

    def score(self, images, prompts):
        return [np.asarray(im.convert("RGB"))[..., 0].mean() / 255 + self.bonus * ("red" in p)
                for im, p in zip(images, prompts, strict=True)]


def broken_factory():
    raise RuntimeError("weights not found\nsecond line")


def test_toy_scorer_and_registry():
    assert isinstance(ToyScorer(), Scorer)
    register_scorer("toy", "test_external:ToyScorer")
    scorers, skipped = load_scorers(
        ["toy", "test_external:broken_factory", "no_such_pkg.mod:Thing", "test_external:ToyScorer"],
        {"toy": {"bonus": 2.0}},
    )
    assert [s.name for s in scorers] == ["toy", "toy"] and scorers[0].bonus == 2.0
    assert skipped["test_external:broken_factory"] == "failed to load (RuntimeError: weights not found)"
    assert "not installed" in skipped["no_such_pkg.mod:Thing"]
    with pytest.raises(ConfigError, match="unknown scorer 'nope'"):
        load_scorers(["nope"])

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    res = score_images([ToyScorer()], [red, blue, blue], ["red", "blue", "red"], batch_size=2)
    assert res["toy"]["per_image"] == [2.0, 0.0, 1.0] and res["toy"]["mean"] == 1.0


def test_missing_packages_are_skipped_with_one_line():
    import importlib.util

    names = [n for n in ("imagereward", "hpsv2", "ocr") if importlib.util.find_spec(
        {"imagereward": "ImageReward", "hpsv2": "hpsv2", "ocr": "easyocr"}[n]) is None]
    scorers, skipped = load_scorers(names)
    assert scorers == [] and set(skipped) == set(names)
    assert all("\n" not in v and "not installed" in v for v in skipped.values())


def test_ocr_scorer_with_injected_reader():
    ocr = OcrScorer(reader=lambda im: "Hel1o  World")
    s = ocr.score([Image.new("RGB", (4, 4))] * 3, ['a sign that says "Hello World"', "'hello world'", 'text "xyz"'])
    assert s[0] == pytest.approx(0.9) and s[1] == pytest.approx(0.9) and s[2] == 0.0


def test_clip_scorer_on_a_tiny_local_clip(tmp_path):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    vocab, _ = tiny_vocabs()
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                               crop_size={"height": 16, "width": 16}), tokenizer=tok)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    sc = ClipScorer(str(tmp_path / "clip"), device="cpu", local_files_only=True)
    imgs = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 99, 199))]
    prompts = ["a red square", "a green field", "blue", "a cat"]
    s = sc.score(imgs, prompts)
    pick = ClipScorer(str(tmp_path / "clip"), device="cpu", kind="logits", local_files_only=True)
    p = pick.score(imgs, prompts)
    # Independent path: CLIPModel's own forward gives logit_scale * cos for every (image, text) pair.
    inputs = proc(text=prompts, images=imgs, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = pick.model(**inputs).logits_per_image.diagonal()
    scale = pick.model.logit_scale.exp().item()
    np.testing.assert_allclose(p, logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, np.clip(logits.numpy() / scale, 0, None) * 100, rtol=1e-4, atol=1e-4)
    assert len(set(np.round(p, 6))) == 4


def test_run_external_eval_writes_results(tiny_sd3_dir, tmp_path):
    pf = tmp_path / "prompts.jsonl"
    pf.write_text("\n".join(json.dumps({"prompt": p, "tag": t}) for p, t in [("a red cat", "a"), ("a blue sky", "b")]))
    cfg = ExternalEvalConfig(
        pretrained_model_name_or_path=str(tiny_sd3_dir), prompt_file=str(pf), output_dir=str(tmp_path / "ev"),
        scorers=["test_external:ToyScorer", "no_such_pkg.x:Y"], num_inference_steps=4, images_per_prompt=2,
        max_sequence_length=16, geneval_layout=True,
    )
    res = run_external_eval(cfg)
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["scores"]["toy"]["per_image"] == res["scores"]["toy"]["per_image"]
    vals = res["scores"]["toy"]["per_image"]
    assert len(vals) == 4 and all(v >= 1 for v in vals[:2]) and all(v < 1 for v in vals[2:])
    assert list(saved["skipped"]) == ["no_such_pkg.x:Y"] and len(saved["images"]) == 4
    g = tmp_path / "ev" / "geneval"
    assert json.loads((g / "00001" / "metadata.jsonl").read_text())["tag"] == "b"
    assert sorted(p.name for p in (g / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]
