"""The GRPO loss on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from backend.loss import LossStats, entropy_from_logprobs, group_advantages, grpo_loss

torch.set_num_threads(1)


def t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# --- advantages ---------------------------------------------------------------------------


def test_group_advantages_subtract_the_group_mean() -> None:
    rewards = t([1, 0, 0, 0, 1, 1, 0, 1])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, groups, scale=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25])


def test_group_advantages_scale_by_unbiased_std_plus_eps() -> None:
    # group [1, 0, 0, 0]: mean 0.25, unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25 -> std 0.5
    adv = group_advantages(t([1, 0, 0, 0]), torch.zeros(4, dtype=torch.long), scale=True, eps=1e-4)
    assert adv.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])


def test_group_advantages_equal_rewards_give_zero_and_groups_may_interleave() -> None:
    rewards = t([1, 0, 1, 2])
    groups = torch.tensor([7, 3, 7, 3])  # arbitrary ids, not contiguous
    adv = group_advantages(rewards, groups, scale=True)
    assert adv[0] == 0 and adv[2] == 0  # group 7: equal rewards
    # group 3: [0, 2], mean 1, unbiased std sqrt(2)
    assert adv[1].item() == pytest.approx(-1 / (math.sqrt(2) + 1e-4))
    assert adv[3].item() == pytest.approx(1 / (math.sqrt(2) + 1e-4))


def test_group_of_one_has_zero_advantage() -> None:
    adv = group_advantages(t([0.7]), torch.tensor([0]), scale=True)
    assert adv.tolist() == [0.0]


# --- policy gradient, clipping, masking -------------------------------------------------------


def _lp(ratio: float) -> float:
    return math.log(ratio)


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_advantage() -> None:
    # 2 sequences x 3 positions; position 0 is prompt. ratio = 1 everywhere.
    behavior = t([[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]])
    logp = behavior.clone().requires_grad_(True)
    mask = t([[0, 1, 1], [0, 1, 0]])
    adv = t([2.0, -1.0])
    out = grpo_loss(logp, behavior, adv, mask)
    # per token: -A * 1 ; tokens: 2 of seq 0 (A=2), 1 of seq 1 (A=-1) -> (-2 -2 +1)/3
    assert out.loss.item() == pytest.approx(-1.0)
    out.loss.backward()
    # d/dlogp of -A*exp(logp - b) / 3 at ratio 1 = -A/3 on loss tokens, 0 elsewhere
    assert torch.allclose(logp.grad, t([[0, -2 / 3, -2 / 3], [0, 1 / 3, 0]]))
    assert out.stats.tokens == 3
    s = out.stats.summary()
    assert s["ir"] == pytest.approx(1.0) and s["clip_frac"] == 0 and s["masked_frac"] == 0
    assert s["mismatch_kl"] == pytest.approx(0.0)


def test_clipping_stops_the_gradient_beyond_the_trust_region() -> None:
    # one sequence, 4 loss tokens with ratios 1.5, 0.5, 1.5, 0.5 and advantage +1 then -1
    behavior = t([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    logp = t([[_lp(1.5), _lp(0.5), 0, 0], [_lp(1.5), _lp(0.5), 0, 0]]).requires_grad_(True)
    mask = t([[1, 1, 0, 0], [1, 1, 0, 0]])
    adv = t([1.0, -1.0])
    out = grpo_loss(logp, behavior, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    # A=+1: ratio 1.5 -> min(1.5, 1.28) = 1.28 (clipped); ratio 0.5 -> min(0.5, 0.8) = 0.5
    # A=-1: ratio 1.5 -> min(-1.5, -1.28) = -1.5;        ratio 0.5 -> min(-0.5, -0.8) = -0.8 (clipped)
    expected = (-1.28 - 0.5 + 1.5 + 0.8) / 4
    assert out.loss.item() == pytest.approx(expected)
    out.loss.backward()
    g = logp.grad
    assert g[0, 0] == 0 and g[1, 1] == 0  # clipped tokens carry no gradient
    assert g[0, 1].item() == pytest.approx(-0.5 / 4)  # d(-ratio)/dlogp = -ratio
    assert g[1, 0].item() == pytest.approx(1.5 / 4)
    assert out.stats.clipped == 2
    assert out.stats.summary()["clip_frac"] == pytest.approx(0.5)
    assert out.stats.ratio_min == pytest.approx(0.5) and out.stats.ratio_max == pytest.approx(1.5)


def test_tokens_outside_the_ratio_band_are_masked_but_stay_in_the_denominator() -> None:
    behavior = t([[0.0, 0.0, 0.0]])
    logp = t([[_lp(20.0), _lp(0.05), _lp(1.1)]]).requires_grad_(True)
    mask = t([[1, 1, 1]])
    adv = t([1.0])
    out = grpo_loss(
        logp, behavior, adv, mask, mask_ratio_low=0.1, mask_ratio_high=10.0, clip_eps_low=0.2, clip_eps_high=0.28
    )
    # only the third token counts: -1.1 * 1 ; denominator stays 3
    assert out.loss.item() == pytest.approx(-1.1 / 3)
    out.loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0
    assert logp.grad[0, 2].item() == pytest.approx(-1.1 / 3)
    assert out.stats.masked == 2
    assert out.stats.summary()["masked_frac"] == pytest.approx(2 / 3)


def test_kl_to_reference_is_the_k3_estimator_times_beta() -> None:
    behavior = t([[0.0, -1.0]])
    logp = behavior.clone().requires_grad_(True)
    ref = t([[0.0, -1.5]])
    mask = t([[0, 1]])
    adv = t([0.0])  # no policy gradient: the loss is the KL term alone
    out = grpo_loss(logp, behavior, adv, mask, ref_logprobs=ref, beta=0.1)
    d = -0.5  # ref - logp
    k3 = math.exp(d) - d - 1
    assert out.loss.item() == pytest.approx(0.1 * k3)
    assert out.stats.summary()["kl"] == pytest.approx(k3)
    out.loss.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = -exp(d) + 1
    assert logp.grad[0, 1].item() == pytest.approx(0.1 * (1 - math.exp(d)))


def test_kl_is_logged_but_not_trained_when_beta_is_zero() -> None:
    behavior = t([[-1.0]])
    logp = behavior.clone().requires_grad_(True)
    out = grpo_loss(logp, behavior, t([0.0]), t([[1]]), ref_logprobs=t([[-2.0]]), beta=0.0)
    assert out.loss.item() == 0.0
    assert out.stats.summary()["kl"] == pytest.approx(math.exp(-1) + 1 - 1)


def test_mismatch_kl_measures_behaviour_versus_trainer() -> None:
    behavior = t([[-1.0, -2.0]])
    logp = t([[-1.2, -2.0]])
    out = grpo_loss(logp, behavior, t([1.0]), t([[1, 1]]))
    lr = -0.2  # trainer - behaviour
    assert out.stats.summary()["mismatch_kl"] == pytest.approx((math.exp(lr) - lr - 1) / 2)
    assert out.stats.summary()["ir"] == pytest.approx((math.exp(-0.2) + 1) / 2)


def test_sequence_aggregation_weights_sequences_equally() -> None:
    behavior = torch.zeros(2, 4, dtype=torch.float64)
    logp = behavior.clone().requires_grad_(True)
    mask = t([[1, 1, 1, 1], [1, 0, 0, 0]])
    adv = t([1.0, -1.0])
    tok = grpo_loss(logp, behavior, adv, mask, agg="token")
    seq = grpo_loss(logp, behavior, adv, mask, agg="sequence")
    assert tok.loss.item() == pytest.approx((-4 + 1) / 5)
    assert seq.loss.item() == pytest.approx((-1 + 1) / 2)


def test_micro_batches_with_the_batch_denominator_sum_to_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    B, L = 6, 5
    behavior = -torch.rand(B, L, dtype=torch.float64)
    base = behavior + 0.1 * torch.randn(B, L, dtype=torch.float64)
    mask = (torch.rand(B, L) > 0.3).double()
    mask[:, 0] = 1
    adv = torch.randn(B, dtype=torch.float64)
    for agg, denom in (("token", float(mask.sum())), ("sequence", float(B))):
        full = base.clone().requires_grad_(True)
        grpo_loss(full, behavior, adv, mask, agg=agg).loss.backward()
        parts = base.clone().requires_grad_(True)
        total = 0.0
        for sl in (slice(0, 2), slice(2, 6)):
            out = grpo_loss(parts[sl], behavior[sl], adv[sl], mask[sl], agg=agg, denominator=denom)
            out.loss.backward()
            total += out.loss.item()
        assert torch.allclose(parts.grad, full.grad)


def test_padding_with_infinite_logprobs_does_not_poison_the_loss() -> None:
    behavior = t([[0.0, -1.0]])
    logp = t([[-math.inf, -1.0]]).requires_grad_(True)
    out = grpo_loss(logp, behavior, t([1.0]), t([[0, 1]]))
    assert math.isfinite(out.loss.item())


def test_stats_merge_and_summary() -> None:
    a = LossStats(tokens=2, sequences=1, ratio_sum=2.2, ratio_min=0.9, ratio_max=1.3, clipped=1)
    b = LossStats(tokens=2, sequences=1, ratio_sum=1.8, ratio_min=0.8, ratio_max=1.0, masked=1)
    s = a.merge(b).summary()
    assert s["ir"] == pytest.approx(1.0) and s["ir_min"] == 0.8 and s["ir_max"] == 1.3
    assert s["clip_frac"] == 0.25 and s["masked_frac"] == 0.25
    assert math.isnan(LossStats().summary()["ir"])


def test_entropy_of_uniform_and_peaked_distributions() -> None:
    lp = torch.log_softmax(t([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]), dim=-1)
    ent = entropy_from_logprobs(lp)
    assert ent[0].item() == pytest.approx(math.log(4))
    assert ent[1].item() == pytest.approx(0.0, abs=1e-10)


def test_unknown_aggregation_is_rejected() -> None:
    with pytest.raises(ValueError):
        grpo_loss(t([[0.0]]), t([[0.0]]), t([0.0]), t([[1]]), agg="sample")  # type: ignore[arg-type]
