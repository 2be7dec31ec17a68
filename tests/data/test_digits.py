import torch

from soar_fast.data import NUM_CLASSES, DigitsDataset, ResumableSampler, load_digits_tensors


def _ds(seed=3, tokens=2):
    return DigitsDataset(resolution=8, prompt_tokens=tokens, joint_attention_dim=16, pooled_projection_dim=12,
                         embedding_seed=seed)


def test_digits_are_the_real_sklearn_set_scaled_to_unit_range():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1
    assert sorted(y.unique().tolist()) == list(range(10))
    up, _ = load_digits_tensors(16)
    assert up.shape == (1797, 1, 16, 16) and up.min() >= -1 and up.max() <= 1


def test_conditions_are_fixed_per_class_and_the_empty_prompt_is_its_own():
    ds, again, other = _ds(), _ds(), _ds(seed=4)
    idx = torch.tensor([0, 1, 2, 10])
    z0, (pe, pooled), labels = ds.batch(idx)
    assert z0.shape == (4, 1, 8, 8) and pe.shape == (4, 2, 16) and pooled.shape == (4, 12)
    assert torch.equal(pe, again.batch(idx)[1][0]) and not torch.equal(pe, other.batch(idx)[1][0])
    u_pe, u_pool = ds.uncond()
    assert u_pe.shape == (2, 16) and u_pool.shape == (12,)
    for c in range(NUM_CLASSES):
        assert not torch.equal(ds.prompt_table[c], u_pe)
    same = ds.labels == labels[0]
    assert torch.equal(ds.condition(ds.labels[same])[0][0], pe[0])


def test_sampler_visits_every_row_once_per_epoch_and_resumes_exactly():
    s = ResumableSampler(n=10, batch_size=4, seed=1)
    first = torch.cat([s.next_indices() for _ in range(5)])  # 20 rows: exactly two epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:])  # a fresh permutation per epoch
    a = ResumableSampler(n=10, batch_size=4, seed=1)
    a.next_indices(), a.next_indices(), a.next_indices()
    b = ResumableSampler(n=10, batch_size=4, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        assert torch.equal(a.next_indices(), b.next_indices())
