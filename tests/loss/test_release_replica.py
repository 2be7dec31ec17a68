"""`SoarConfig.reference_release()` reproduces the public release's training step on the release's
own draws: loss and every parameter gradient, fp32 and bf16 targets, SFT and several paths included.

The oracle below is this test's restatement of the arithmetic of Tencent-Hunyuan/HY-SOAR @ 59f0e02
(soar/train_soar_sd3_5m.py, the loop body of `main`; soar/utils/algorithm.py,
`single_step_aux_points`, `stochastic_rollout_step`, `t_to_sigma_timestep`, `sigma_to_t`), read
from the release, written for one process, calling the same diffusers scheduler and transformer
class directly: in fp32 (`--mixed_precision no`), and in the release's bf16 arithmetic (its
`weight_dtype` casts, on a toy transformer whose output keeps bf16) for `target_dtype="model"`.
Its random numbers (z_1, t0, each path's `rand_fracs` over the samples it covers, each
stochastic path's noise, the dropout draw) are inputs, and `assemble_draws` turns the same
numbers into our `SoarDraws`.
"""

import copy
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3

import soar_fast as sf
from soar_fast.loss import assemble_draws
from soar_fast.models import SD3VelocityFn, build_sd3_transformer


def _call(tr, z, ts, pe, ppe):
    return tr(hidden_states=z, timestep=ts, encoder_hidden_states=pe, pooled_projections=ppe, return_dict=False)[0]


def _release_sde(x, v, noise, s_cur, s_next, kind, scale, s_max):
    """The four stochastic one-step updates of the release, on fixed noise (fp32)."""
    sc, sn = s_cur.view(-1, 1, 1, 1), s_next.view(-1, 1, 1, 1)
    dt = sn - sc
    if kind == "simple":
        return x + v * dt + scale * dt.abs().sqrt() * noise
    if kind == "sde":
        return (1 - sn) * (x - sc * v) + sn * noise
    if kind == "flow_sde":
        std = (sc / (1 - torch.where(sc == 1, torch.full_like(sc, s_max), sc))).sqrt() * scale
        mean = x * (1 + std**2 / (2 * sc) * dt) + v * (1 + std**2 * (1 - sc) / (2 * sc)) * dt
        return mean + std * (-dt).clamp_min(0).sqrt() * noise
    std = sn * math.sin(scale * math.pi / 2)  # cps
    mean = (x - sc * v) * (1 - sn) + (x + v * (1 - sc)) * (sn**2 - std**2).clamp_min(0).sqrt()
    return mean + std * noise


def release_step(tr, z_0, pe, ppe, u_pe, u_ppe, raw, *, paths, points, kind="flow_sde", scale=0.5,
                 weighting="logit_normal", lam=1.0, steps=40, g=4.5, drop_rate=0.0):
    """The release's loss_total of one step (world size 1), given its random numbers `raw`."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    n = len(sched.timesteps)

    def t_to_sigma_ts(t):
        i = ((1.0 - t) * n).long().clamp(0, n - 1)
        return sched.sigmas.to(t.dtype)[i], sched.timesteps[i]

    def sigma_to_t(s):
        i = torch.searchsorted(-sched.sigmas[:n].to(s.dtype), -s).clamp(0, n - 1)
        return 1.0 - i.float() / n

    b, wd = z_0.shape[0], z_0.dtype  # wd: the release's weight_dtype (z_0 is cast to it)
    if raw["dropout_draw"] < drop_rate:
        pe, ppe = u_pe.expand(b, -1, -1).clone(), u_ppe.expand(b, -1).clone()
    z_1, t0 = raw["z_1"].to(wd), raw["t0"]
    s0, ts0 = t_to_sigma_ts(t0)
    s0w = s0.view(-1, 1, 1, 1).to(wd)
    z_t0 = (1 - s0w) * z_0 + s0w * z_1
    v_t0 = _call(tr, z_t0, ts0, pe, ppe)
    w0 = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=s0w)
    loss_main = (w0.float() * (v_t0.float() - (z_1 - z_0).float()) ** 2).reshape(b, -1).mean(1).sum()
    loss_aux, aux_count = torch.zeros(()), 0.0
    if lam > 0 and points > 0:
        with torch.no_grad():
            out = _call(tr, torch.cat([z_t0, z_t0]), torch.cat([ts0, ts0]),
                        torch.cat([u_pe.expand(b, -1, -1), pe]), torch.cat([u_ppe.expand(b, -1), ppe]))
            v_u, v_c = out.chunk(2)
            v_cfg = v_u + g * (v_c - v_u)
        t1 = (t0 - 1.0 / float(steps)).clamp_min(0.0)
        s1, _ = t_to_sigma_ts(t1)
        starts = [(torch.arange(b), z_t0 + v_cfg * (s1.view(-1, 1, 1, 1).to(wd) - s0w))]
        act = (t1 > 0).nonzero().squeeze(1)
        if act.numel() > 0:
            for p in range(paths - 1):
                z_sde = _release_sde(z_t0[act].float(), v_cfg[act].float(), raw["noise"][p], s0[act], s1[act],
                                     kind, scale, float(sched.sigmas[1])).to(wd)
                starts.append((act, z_sde))
        for p, (idx, z_start) in enumerate(starts):
            s1_p = s1[idx]
            s_targets = s1_p.unsqueeze(0) + raw["fracs"][p] * (1 - s1_p).unsqueeze(0)
            for j in range(points):
                sp = s_targets[j]
                a = ((sp - s1_p) / (1 - s1_p).clamp_min(1e-8)).clamp(0, 1).view(-1, 1, 1, 1).to(wd)
                z_p = (1 - a) * z_start + a * z_1[idx]
                _, ts_p = t_to_sigma_ts(sigma_to_t(sp))
                spw = sp.view(-1, 1, 1, 1).to(wd)
                v_corr = (z_p - z_0[idx]) / spw
                v_p = _call(tr, z_p, ts_p, pe[idx], ppe[idx])
                w = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=spw)
                err2 = (v_p.float() - v_corr.float()) ** 2
                loss_aux = loss_aux + lam * (w.float() * err2).reshape(len(idx), -1).mean(1).sum()
                aux_count += float(len(idx))
    return (loss_main + loss_aux) / max(b + lam * aux_count, 1.0)


def _raw(b, paths, points, seed, t0=None, dropout_draw=0.9):
    """The release's random numbers for one step, and which samples its stochastic paths cover."""
    g = torch.Generator().manual_seed(seed)
    z_1 = torch.randn(b, 4, 4, 4, generator=g)
    t0 = torch.sigmoid(torch.randn(b, generator=g)) if t0 is None else torch.tensor(t0)
    act = ((t0 - 1.0 / 40).clamp_min(0.0) > 0).nonzero().squeeze(1)
    fracs = [torch.rand(points, b, generator=g)] + [torch.rand(points, len(act), generator=g) for _ in range(paths - 1)]
    noise = [torch.randn(len(act), 4, 4, 4, generator=g) for _ in range(paths - 1)]
    return {"z_1": z_1, "t0": t0, "fracs": fracs, "noise": noise, "dropout_draw": dropout_draw}, act


def _our_draws(raw, act, cfg, b):
    """The release's numbers laid out as ours: a path's fracs and noise at the samples it covers
    (anything elsewhere: those points do not exist)."""
    frac = torch.full((cfg.num_points, b), 0.5)
    noise = torch.zeros(cfg.num_rollout_paths - 1, *raw["z_1"].shape) if cfg.num_rollout_paths > 1 else None
    for p, fr in enumerate(raw["fracs"][: cfg.num_rollout_paths] if cfg.num_points else []):
        cols = torch.arange(b) if p == 0 else act
        frac[p * cfg.num_aux:(p + 1) * cfg.num_aux, cols] = fr
        if p > 0:
            noise[p - 1, act] = raw["noise"][p - 1]
    keep = torch.full((b,), float(raw["dropout_draw"]))
    return assemble_draws(cfg, z1=raw["z_1"], u0=raw["t0"], frac=frac, keep=keep, sde_noise=noise)


def _inputs(b, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    z_0 = torch.randn(b, 4, 4, 4, generator=g)
    pe, ppe = torch.randn(b, 5, 32, generator=g), torch.randn(b, 64, generator=g)
    return z_0, pe, ppe, torch.randn(1, 5, 32, generator=g), torch.randn(1, 64, generator=g)


CASES = [
    pytest.param(dict(num_aux=0), 1, None, 0.9, id="sft"),
    pytest.param({}, 1, None, 0.9, id="release-defaults"),
    pytest.param(dict(num_aux=2, num_rollout_paths=3), 3, [0.01, 0.6, 0.9], 0.9, id="P3-flow_sde-one-at-t1=0"),
    pytest.param(dict(num_aux=2, num_rollout_paths=2, sde_rollout_type="cps"), 2, None, 0.9, id="P2-cps"),
    pytest.param(dict(num_aux=2, num_rollout_paths=2, sde_rollout_type="simple"), 2, None, 0.9, id="P2-simple"),
    pytest.param(dict(num_aux=1, num_rollout_paths=2, sde_rollout_type="sde"), 2, [0.3, 0.99, 0.5], 0.9,
                 id="P2-sde"),
    pytest.param(dict(num_aux=2, weighting="sigma_sqrt", cond_dropout=0.5), 1, [0.2, 0.5, 0.95], 0.1,
                 id="sigma_sqrt-batch-dropout"),
    pytest.param(dict(num_aux=2, weighting="cosmap", lambda_aux=0.5), 1, None, 0.9, id="cosmap-lambda0.5"),
]


@pytest.mark.parametrize("overrides,paths,t0,dropout_draw", CASES)
def test_reference_release_equals_the_release_step(overrides, paths, t0, dropout_draw):
    b = 3
    cfg = sf.SoarConfig.reference_release(**overrides)
    raw, act = _raw(b, paths, cfg.num_aux, seed=7, t0=t0, dropout_draw=dropout_draw)
    z_0, pe, ppe, u_pe, u_ppe = _inputs(b)
    ours_model = build_sd3_transformer("tiny", seed=0)
    rel_model = copy.deepcopy(ours_model)

    want = release_step(rel_model, z_0, pe, ppe, u_pe, u_ppe, raw, paths=cfg.num_rollout_paths,
                        points=cfg.num_aux, kind=cfg.sde_rollout_type, scale=cfg.sde_noise_scale,
                        weighting=cfg.weighting, lam=cfg.lambda_aux, drop_rate=cfg.cond_dropout)
    want.backward()
    draws = _our_draws(raw, act, cfg, b)
    out = sf.soar_loss_from_draws(SD3VelocityFn(ours_model), z_0, (pe, ppe), (u_pe[0], u_ppe[0]), cfg, draws)
    out.loss.backward()

    assert abs(out.loss.item() - want.item()) <= 1e-5 * abs(want.item())
    g_ours = torch.cat([p.grad.flatten() for p in ours_model.parameters()])
    g_rel = torch.cat([p.grad.flatten() for p in rel_model.parameters()])
    assert torch.nn.functional.cosine_similarity(g_ours, g_rel, dim=0) >= 0.99999
    assert (g_ours - g_rel).norm() <= 1e-3 * g_rel.norm()


def test_our_defaults_differ_from_the_release_step():
    """Sanity of the oracle: our own defaults (continuous σ, per-sample model timestep) do not
    reproduce the release's numbers, so the equality above is the fields' doing."""
    b = 3
    cfg = sf.SoarConfig(num_aux=6)
    raw, act = _raw(b, 1, 6, seed=7)
    z_0, pe, ppe, u_pe, u_ppe = _inputs(b)
    model = build_sd3_transformer("tiny", seed=0)
    want = release_step(model, z_0, pe, ppe, u_pe, u_ppe, raw, paths=1, points=6)
    out = sf.soar_loss_from_draws(SD3VelocityFn(model), z_0, (pe, ppe), (u_pe[0], u_ppe[0]), cfg,
                                  _our_draws(raw, act, cfg, b))
    assert abs(out.loss.item() - want.item()) > 1e-5 * abs(want.item())


class _ToyTransformer(torch.nn.Module):
    """A transformer-shaped toy whose output keeps the input's dtype, like a bf16 model under
    DeepSpeed (parameters fp32 here so both sides' gradients compare in fp32)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lin = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.5)
        self.t = torch.nn.Parameter(torch.randn(4, generator=g))
        self.pool = torch.nn.Parameter(torch.randn(64, 4, generator=g) * 0.1)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        x = hidden_states.float().permute(0, 2, 3, 1)
        scale = 1 + torch.tanh(timestep.float()[:, None] / 1000 * self.t)[:, None, None, :]
        h = x @ self.lin * scale + (pooled_projections.float() @ self.pool)[:, None, None, :]
        h = h + encoder_hidden_states.float().mean((1, 2))[:, None, None, None]
        return (h.permute(0, 3, 1, 2).to(hidden_states.dtype),)


def _toy_velocity(tr):
    def vf(z, sigma, cond):
        return _call(tr, z, 1000 * sigma, cond[0], cond[1])  # fp32 timesteps, as the release passes them

    return vf


@pytest.mark.parametrize("overrides,paths,t0", [
    pytest.param({}, 1, None, id="P1"),
    pytest.param(dict(num_aux=2, num_rollout_paths=3, weighting="sigma_sqrt"), 3, [0.01, 0.6, 0.9],
                 id="P3-flow_sde-sigma_sqrt"),
])
def test_target_dtype_model_reproduces_the_release_bf16_arithmetic(overrides, paths, t0):
    b = 3
    cfg = sf.SoarConfig.reference_release(**overrides)
    raw, act = _raw(b, paths, cfg.num_aux, seed=11, t0=t0)
    raw["z_1"] = raw["z_1"].bfloat16().float()  # the release draws z_1 = randn_like(z_0) in bf16
    z_0, pe, ppe, u_pe, u_ppe = _inputs(b)
    z_0 = z_0.bfloat16()
    ours, rel = _ToyTransformer(), _ToyTransformer()
    want = release_step(rel, z_0, pe, ppe, u_pe, u_ppe, raw, paths=cfg.num_rollout_paths, points=cfg.num_aux,
                        weighting=cfg.weighting)
    want.backward()
    draws = _our_draws(raw, act, cfg, b)
    out = sf.soar_loss_from_draws(_toy_velocity(ours), z_0, (pe, ppe), (u_pe[0], u_ppe[0]), cfg, draws)
    out.loss.backward()
    assert abs(out.loss.item() - want.item()) <= 1e-5 * abs(want.item())
    g_ours = torch.cat([p.grad.flatten() for p in ours.parameters()])
    g_rel = torch.cat([p.grad.flatten() for p in rel.parameters()])
    assert torch.nn.functional.cosine_similarity(g_ours, g_rel, dim=0) >= 0.99999
    assert (g_ours - g_rel).norm() <= 1e-3 * g_rel.norm()
    # fp32 targets on the same bf16 latents are a different step: the field is what matches
    fp32 = sf.soar_loss_from_draws(_toy_velocity(_ToyTransformer()), z_0.float(), (pe, ppe), (u_pe[0], u_ppe[0]),
                                   sf.SoarConfig.reference_release(**overrides, target_dtype="fp32"), draws)
    assert abs(fp32.loss.item() - want.item()) > 1e-5 * abs(want.item())
