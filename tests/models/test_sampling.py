"""models/sampling.py: the batched inverse-CDF draw the serving batcher uses for sampled rows."""

import torch

from posttrain.models.sampling import draw_by_uniforms


def test_inverse_cdf_draw_by_hand():
    probs = torch.tensor([[0.2, 0.5, 0.3]] * 5)
    uniforms = torch.tensor([0.0, 0.19, 0.2, 0.69, 0.99])
    assert draw_by_uniforms(probs, uniforms).tolist() == [0, 0, 1, 1, 2]  # [0, .2) -> 0, [.2, .7) -> 1, [.7, 1) -> 2
    masked = torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 3)  # top-k / top-p zeros are never drawn
    assert draw_by_uniforms(masked, torch.tensor([0.0, 0.49, 0.5])).tolist() == [1, 1, 3]


def test_inverse_cdf_draw_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.6, 0.3]]).expand(20000, 3)
    tokens = draw_by_uniforms(probs, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(tokens, minlength=3).float() / 20000
    assert torch.allclose(freq, probs[0], atol=0.015)


def test_row_sampler_follows_temperature_and_top_p_and_each_row_keeps_its_stream():
    from posttrain.models.sampling import RowSampler

    logits = torch.tensor([[0.1, 0.6, 0.3]]).log()
    sampler = RowSampler([0], temperature=1.0, top_p=1.0, device=torch.device("cpu"))
    draws = torch.cat([sampler.draw(logits, [0]) for _ in range(6000)])
    assert torch.allclose(torch.bincount(draws, minlength=3).float() / 6000, torch.tensor([0.1, 0.6, 0.3]),
                          atol=0.02)
    top = RowSampler([1], temperature=1.0, top_p=0.85, device=torch.device("cpu"))  # keeps 0.6 + 0.3
    assert set(torch.cat([top.draw(logits, [0]) for _ in range(500)]).tolist()) == {1, 2}
    both = RowSampler([5, 7], temperature=0.7, top_p=1.0, device=torch.device("cpu"))
    alone = RowSampler([7], temperature=0.7, top_p=1.0, device=torch.device("cpu"))
    batch = logits.expand(2, 3)
    together = [both.draw(batch, [0, 1])[1].item() for _ in range(50)]
    assert together == [alone.draw(logits, [0])[0].item() for _ in range(50)]
