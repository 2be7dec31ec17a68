"""Metrics on known cases: exact samplers, perfect samplers, Frechet distance identities."""

import numpy as np
import pytest
import torch

from soar_fast.config import EvalConfig
from soar_fast.data import DigitsDataset
from soar_fast.eval.classifier import load_or_train_classifier, split_indices
from soar_fast.eval.evaluate import evaluate_model
from soar_fast.eval.metrics import exposure_bias, frechet_distance
from soar_fast.eval.sampler import euler_sample, sampler_sigmas


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier")


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset(resolution=8, prompt_tokens=1, joint_attention_dim=8, pooled_projection_dim=8,
                         embedding_seed=0)


def _exact_field(target: torch.Tensor):
    """The exact rectified-flow velocity of a one-point data set: v(z, σ) = (z − z0*) / σ."""
    def v(z, sigma, cond):
        return (z - target) / sigma.view(-1, *([1] * (z.dim() - 1)))
    return v


def test_sampler_grid_runs_from_noise_to_data():
    s = sampler_sigmas(40, 3.0)
    assert s[0] == 1 and s[-1] == 0 and bool((s[1:] < s[:-1]).all())


def test_euler_with_the_exact_velocity_lands_on_the_data_point():
    target = torch.randn(1, 1, 4, 4)
    z1 = torch.randn(5, 1, 4, 4)
    cond = (torch.zeros(5, 1, 2), torch.zeros(5, 2))
    z0 = euler_sample(_exact_field(target), z1, cond, (torch.zeros(1, 2), torch.zeros(2)), num_steps=7,
                      guidance_scale=4.5, shift=3.0, batch_size=2)
    torch.testing.assert_close(z0, target.expand(5, -1, -1, -1), atol=1e-5, rtol=0)


def test_exposure_bias_is_zero_for_an_exact_model():
    target = torch.randn(1, 1, 4, 4)
    z0 = target.expand(6, -1, -1, -1)
    cond = (torch.zeros(6, 1, 2), torch.zeros(6, 2))
    uncond = (torch.zeros(1, 2), torch.zeros(2))
    exact = exposure_bias(_exact_field(target), z0, cond, uncond, num_steps=10, guidance_scale=4.5, shift=3.0,
                          window=3, num_sigmas=5, seed=0)
    assert len(exact["sigma"]) == 5 and max(exact["drift"]) < 1e-5
    assert max(exact["err_own"]) < 1e-8 and max(exact["err_true"]) < 1e-8


def test_exposure_bias_shows_a_model_right_on_true_states_but_blind_off_them():
    """A model that memorised each pair's velocity z1 − z0 (exact on true states, no correction off
    them) and has a zero unconditional branch: CFG overshoots, the sampler leaves the trajectory,
    and only the own-sampler error sees it."""
    z0 = torch.randn(6, 1, 4, 4)
    z1 = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))  # the draw exposure_bias makes
    cond = (torch.zeros(6, 1, 2), torch.zeros(6, 2))
    uncond = (torch.ones(1, 2), torch.ones(2))

    def memoriser(z, sigma, c):
        v = (z1 - z0).repeat(z.shape[0] // z0.shape[0], 1, 1, 1)
        v[c[0][:, 0, 0] == 1] = 0  # the empty prompt
        return v

    kw = dict(num_steps=10, shift=3.0, window=3, num_sigmas=5, seed=7)
    plain = exposure_bias(memoriser, z0, cond, uncond, guidance_scale=1.0, **kw)
    assert max(plain["err_own"]) < 1e-10 and max(plain["err_true"]) < 1e-10 and max(plain["drift"]) < 1e-6
    cfg = exposure_bias(memoriser, z0, cond, uncond, guidance_scale=4.5, **kw)
    assert max(cfg["err_true"]) < 1e-10 and min(cfg["drift"]) > 0.05
    assert all(o > 1e-3 for o in cfg["err_own"])


def test_frechet_distance_identities():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = np.array([1.0, -2.0, 0.5, 0, 0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    b = rng.normal(size=(400, 6)) * 2.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) > 1.0


def test_a_perfect_sampler_scores_the_real_datas_accuracy(digits, clf_dir):
    clf, meta = load_or_train_classifier(clf_dir)
    assert meta["held_out_accuracy"] > 0.9
    _, held = split_indices(len(digits))
    held_labels = digits.labels[held]

    def perfect(labels):  # real held-out digits of the requested classes, each used once per class
        by_class = {c: held[held_labels == c].tolist() for c in range(10)}
        return digits.images[[by_class[int(c)].pop(0) for c in labels]]

    ec = EvalConfig(run_dir="unused", num_samples=300, exposure_samples=0)
    res = evaluate_model(None, digits, ec, shift=3.0, classifier_dir=clf_dir, generate=perfect)
    assert res["real_accuracy"] == meta["held_out_accuracy"]
    assert res["accuracy"] == pytest.approx(meta["held_out_accuracy"], abs=0.03)
    wrong = evaluate_model(None, digits, ec, shift=3.0, classifier_dir=clf_dir,
                           generate=lambda labels: perfect((labels + 1) % 10))
    assert wrong["accuracy"] < 0.1
    noise = evaluate_model(None, digits, ec, shift=3.0, classifier_dir=clf_dir,
                           generate=lambda labels: torch.rand(len(labels), 1, 8, 8) * 2 - 1)
    assert res["frechet_distance"] < 0.1 * noise["frechet_distance"]


def test_the_classifier_is_cached(clf_dir):
    a, _ = load_or_train_classifier(clf_dir)
    mtime = (clf_dir / "classifier.safetensors").stat().st_mtime_ns
    b, _ = load_or_train_classifier(clf_dir)
    assert (clf_dir / "classifier.safetensors").stat().st_mtime_ns == mtime
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
