"""LoRA through peft: settings checks, save -> load_lora_weights round trip, merge for export."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch

from soar_fast.config import ConfigError
from soar_fast.models.lora import (
    LoraSettings,
    apply_lora,
    lora_family,
    merge_lora,
    save_lora_weights,
    trainable_parameters,
)
from soar_fast.models.pipeline import load_pipeline, load_sd3_transformer


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 16, 16, generator=g)
    pe, pooled = torch.randn(2, 20, 32, generator=g), torch.randn(2, 64, generator=g)
    return dict(hidden_states=z, encoder_hidden_states=pe, pooled_projections=pooled,
                timestep=torch.tensor([300.0, 800.0]), return_dict=False)


def _perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_bad_rank(rank):
    with pytest.raises(ConfigError, match="LoraSettings.rank"):
        LoraSettings(rank=rank)


def test_unknown_target_module(tiny_sd3_dir, tmp_path):
    t = load_sd3_transformer(tiny_sd3_dir)
    with pytest.raises(ValueError, match="no LoRA adapter 'default': apply_lora"):
        save_lora_weights(t, tmp_path)
    with pytest.raises(ConfigError, match="match no module"):
        apply_lora(t, LoraSettings(rank=2, target_modules=("no_such_proj",)))


def test_apply_lora_trains_only_adapters_and_starts_at_base(tiny_sd3_dir):
    t = load_sd3_transformer(tiny_sd3_dir)
    base = t(**_inputs())[0]
    apply_lora(t, LoraSettings(rank=4))
    params = dict(t.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {"to_q", "to_k", "to_v", "0"}
    torch.testing.assert_close(t(**_inputs())[0], base)  # B = 0 at init


def test_saved_lora_loads_into_pipeline_with_same_scale(tiny_sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    t = load_sd3_transformer(tiny_sd3_dir)
    apply_lora(t, LoraSettings(rank=4, lora_alpha=2.0))  # scale 0.5: metadata must carry it
    _perturb_adapters(t)
    with torch.no_grad():
        want = t(**_inputs())[0]
    f = save_lora_weights(t, tmp_path / "lora")
    assert f.is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, local_files_only=True)
    with torch.no_grad():
        before = pipe.transformer(**_inputs())[0]
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        got = pipe.transformer(**_inputs())[0]
    assert (want - before).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    via_file = load_pipeline(tiny_sd3_dir, lora_path=f, device="cpu")  # a file path works too
    with torch.no_grad():
        torch.testing.assert_close(via_file.transformer(**_inputs())[0], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        load_pipeline(tiny_sd3_dir, lora_path=tmp_path)


def test_a_lora_of_another_family_is_one_line(tiny_sd3_dir, tiny_flux_dir, tmp_path):
    """The export stamps its family into the safetensors metadata (beside diffusers' own adapter
    metadata, which the pipeline still reads); another family's pipeline refuses it in one line
    instead of loading no key."""
    t = load_sd3_transformer(tiny_sd3_dir)
    apply_lora(t, LoraSettings(rank=4))
    f = save_lora_weights(t, tmp_path / "sd3_lora")
    assert lora_family(f) == "sd3"
    with pytest.raises(ConfigError, match="trained for a sd3 model but .* is a flux pipeline") as err:
        load_pipeline(tiny_flux_dir, lora_path=tmp_path / "sd3_lora", device="cpu")
    assert "\n" not in str(err.value)
    load_pipeline(tiny_sd3_dir, lora_path=tmp_path / "sd3_lora", device="cpu")  # its own family loads it


def test_merge_lora_gives_stock_keys_and_same_output(tiny_sd3_dir):
    t = load_sd3_transformer(tiny_sd3_dir)
    stock_keys = set(t.state_dict())
    apply_lora(t, LoraSettings(rank=4, lora_alpha=8.0))
    _perturb_adapters(t)
    with torch.no_grad():
        want = t(**_inputs())[0]
    merge_lora(t)
    assert set(t.state_dict()) == stock_keys
    with torch.no_grad():
        torch.testing.assert_close(t(**_inputs())[0], want, atol=1e-5, rtol=1e-5)


def test_export_casts_without_touching_the_model(tiny_sd3_dir, tmp_path):
    from safetensors.torch import load_file

    from soar_fast.models.pipeline import export_transformer

    t = load_sd3_transformer(tiny_sd3_dir)
    out = export_transformer(t, tmp_path / "x", mode="transformer", torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in t.parameters())
    ref = {k: v.to(torch.bfloat16) for k, v in t.state_dict().items()}
    got = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert got.keys() == ref.keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="still has LoRA adapters"):
        export_transformer(apply_lora(t, LoraSettings(rank=2)), tmp_path / "y", mode="transformer")
    with pytest.raises(ValueError, match="is a sd3 pipeline but the transformer is"):
        export_transformer(torch.nn.Linear(2, 2), tmp_path / "z", base=tiny_sd3_dir)
