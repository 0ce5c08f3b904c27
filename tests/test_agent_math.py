"""The algorithms' losses, estimators and coefficient rules on tiny hand-made tensors.

Every expected value is worked out by hand in the test (the arithmetic is written next to it), never
by calling the code under test a second way. No model, no env, no training: these run in milliseconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhfgym.agents.common import EnvRollout
from rlhfgym.agents.dpo import dpo_losses, kto_losses, kto_z0
from rlhfgym.agents.nash_md import geometric_mixture_logprobs, nash_md_loss
from rlhfgym.agents.ppo import (
    adaptive_kl_controller,
    approx_kl_to_old,
    clipped_surrogate_loss,
    clipped_value_loss,
    fixed_kl_controller,
    gae_advantages,
    kl_penalty_beta_update,
    kl_penalty_loss,
)
from rlhfgym.agents.reinforce import leave_one_out_advantages, policy_gradient_loss
from rlhfgym.agents.rest import bc_loss, normalise_rewards, rest_filter

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(*values) -> torch.Tensor:
    """A float64 tensor: ``t([1, 2])`` and ``t(1, 2)`` are 1-D, ``t([1, 2], [3, 4])`` is 2-D."""
    data = values[0] if len(values) == 1 and isinstance(values[0], list) else list(values)
    return torch.tensor(data, dtype=torch.float64)


# ============================================================================================ PPO
def test_clipped_surrogate_takes_the_pessimistic_term():
    # r = [1.5, 0.5, 1.1, (pad)], A = [2, -1, -3, 5], eps = 0.2
    log_ratio = t([math.log(1.5), math.log(0.5), math.log(1.1), 0.0]).requires_grad_(True)
    adv, mask = t([2.0, -1.0, -3.0, 5.0]), t([1.0, 1.0, 1.0, 0.0])
    loss = clipped_surrogate_loss(log_ratio, adv, mask, 0.2)
    # t0: min(1.5 * 2, 1.2 * 2) = 2.4        (clipped above: A > 0 and r > 1 + eps)
    # t1: min(0.5 * -1, 0.8 * -1) = -0.8     (clipped below: A < 0 and r < 1 - eps)
    # t2: min(1.1 * -3, 1.1 * -3) = -3.3     (inside the range)
    # t3: padding, not counted.  loss = -(2.4 - 0.8 - 3.3) / 3 = 1.7 / 3
    assert loss.item() == pytest.approx(1.7 / 3, abs=1e-12)
    loss.backward()
    # a clipped term has no gradient; t2: d/dlog r of (-A r) / 3 = -(-3) * 1.1 / 3 = 1.1
    torch.testing.assert_close(log_ratio.grad, t([0.0, 0.0, 1.1, 0.0]))


def test_clipped_surrogate_is_the_plain_surrogate_at_ratio_one():
    # r = 1 everywhere (the first minibatch step): loss = -mean(A) over real tokens = -(1 - 3) / 2 = 1
    loss = clipped_surrogate_loss(t([[0.0, 0.0, 0.0]]), t([[1.0, -3.0, 7.0]]), t([[1.0, 1.0, 0.0]]), 0.2)
    assert float(loss) == pytest.approx(1.0)


def test_clipped_value_loss():
    values, old, ret = t([1.0, 0.0, -1.0]), t([0.5, 0.1, 0.0]), t([2.0, 0.0, -0.5])
    # t0: V_clip = 0.5 + clip(0.5, +-0.2) = 0.7;  max((1 - 2)^2, (0.7 - 2)^2) = max(1, 1.69) = 1.69
    # t1: V_clip = 0.1 + clip(-0.1) = 0.0;        max(0, 0) = 0
    # t2: V_clip = 0 + clip(-1) = -0.2;           max((-1 + 0.5)^2, (-0.2 + 0.5)^2) = max(0.25, 0.09) = 0.25
    # L_V = 1/2 * (1.69 + 0 + 0.25) / 3
    loss = clipped_value_loss(values, old, ret, t([1.0, 1.0, 1.0]), 0.2)
    assert float(loss) == pytest.approx(0.5 * 1.94 / 3, abs=1e-12)
    # a padded token does not count: same loss with a fourth, masked token far off
    loss4 = clipped_value_loss(t([1.0, 0.0, -1.0, 9.0]), t([0.5, 0.1, 0.0, 0.0]), t([2.0, 0.0, -0.5, -9.0]),
                               t([1.0, 1.0, 1.0, 0.0]), 0.2)
    assert float(loss4) == pytest.approx(0.5 * 1.94 / 3, abs=1e-12)


def test_kl_penalty_objective():
    # r = [2, 1/2], A = [1, -2], beta = 0.5
    log_ratio, adv, mask = t([LN2, -LN2]), t([1.0, -2.0]), t([1.0, 1.0])
    # k3 per token: (r - 1) - log r = (1 - ln 2) and (-1/2 + ln 2): mean = (1 - 1/2) / 2 = 0.25
    assert float(approx_kl_to_old(log_ratio, mask)) == pytest.approx(0.25, abs=1e-12)
    # -E[r A] = -(2 * 1 + 0.5 * -2) / 2 = -0.5;  loss = -0.5 + 0.5 * 0.25 = -0.375
    assert float(kl_penalty_loss(log_ratio, adv, mask, 0.5)) == pytest.approx(-0.375, abs=1e-12)
    # beta = 0: the unclipped surrogate alone
    assert float(kl_penalty_loss(log_ratio, adv, mask, 0.0)) == pytest.approx(-0.5, abs=1e-12)
    # the k3 estimate is 0 when nothing moved, whatever the advantages
    assert float(approx_kl_to_old(t([0.0, 0.0]), mask)) == 0.0


def test_kl_penalty_beta_doubles_and_halves_around_the_target():
    delta = 0.01  # 1.5 delta = 0.015, delta / 1.5 = 0.00666...
    assert kl_penalty_beta_update(1.0, 0.016, delta) == 2.0    # KL >= 1.5 delta: x2
    assert kl_penalty_beta_update(1.0, 0.015, delta) == 2.0    # the boundary counts (>=)
    assert kl_penalty_beta_update(1.0, 0.0149, delta) == 1.0   # in between: unchanged
    assert kl_penalty_beta_update(1.0, 0.01, delta) == 1.0
    assert kl_penalty_beta_update(1.0, 0.0067, delta) == 1.0   # just above delta / 1.5
    assert kl_penalty_beta_update(1.0, 0.006, delta) == 0.5    # KL <= delta / 1.5: /2
    assert kl_penalty_beta_update(0.3, 0.0, delta) == pytest.approx(0.15)


def test_reference_kl_controllers():
    # fixed: beta never moves
    for kl in (0.0, 3.0, 100.0):
        assert fixed_kl_controller(0.1, kl, 64, 3.0, 10000) == 0.1
    # proportional (Ziegler et al.): e = clip(KL / target - 1, -0.2, 0.2); beta * (1 + e * n / horizon)
    # KL = 4, target 3: e = clip(1/3) = 0.2;  0.1 * (1 + 0.2 * 64 / 10000) = 0.1 * 1.00128
    assert adaptive_kl_controller(0.1, 4.0, 64, 3.0, 10000) == pytest.approx(0.100128, abs=1e-12)
    # KL = 3.3: e = 0.1 (inside the clip);  0.1 * (1 + 0.1 * 0.0064) = 0.1 * 1.00064
    assert adaptive_kl_controller(0.1, 3.3, 64, 3.0, 10000) == pytest.approx(0.100064, abs=1e-12)
    # KL = 0: e = -1 clipped to -0.2;  0.1 * (1 - 0.00128) = 0.099872
    assert adaptive_kl_controller(0.1, 0.0, 64, 3.0, 10000) == pytest.approx(0.099872, abs=1e-12)
    # on target: unchanged
    assert adaptive_kl_controller(0.1, 3.0, 64, 3.0, 10000) == pytest.approx(0.1, abs=1e-15)
    # n = horizon, KL = 1.2 x target: e = 0.2, beta * 1.2;  KL = 0.9 x target: e = -0.1, beta * 0.9
    assert adaptive_kl_controller(1.0, 1.2, 8, 1.0, 8) == pytest.approx(1.2)
    assert adaptive_kl_controller(1.0, 0.9, 8, 1.0, 8) == pytest.approx(0.9)


def test_gae_on_three_steps():
    # one completion of 3 tokens, reward 1 at the end; gamma = 1, lam = 0.5, V = [0.5, 0.6, 0.7]
    rewards, values, mask = t([0.0, 0.0, 1.0]).view(1, 3), t([0.5, 0.6, 0.7]).view(1, 3), torch.ones(1, 3, dtype=torch.float64)
    adv = gae_advantages(rewards, values, mask, 1.0, 0.5)
    # delta_2 = 1 + 0 - 0.7 = 0.3        (V = 0 after the last token)
    # delta_1 = 0 + 0.7 - 0.6 = 0.1
    # delta_0 = 0 + 0.6 - 0.5 = 0.1
    # A_2 = 0.3;  A_1 = 0.1 + 0.5 * 0.3 = 0.25;  A_0 = 0.1 + 0.5 * 0.25 = 0.225
    torch.testing.assert_close(adv, t([0.225, 0.25, 0.3]).view(1, 3))
    # gamma = 0.5, lam = 1: delta = [0 + 0.3 - 0.5, 0 + 0.35 - 0.6, 0.3] = [-0.2, -0.25, 0.3]
    # A_2 = 0.3;  A_1 = -0.25 + 0.5 * 0.3 = -0.1;  A_0 = -0.2 + 0.5 * -0.1 = -0.25
    torch.testing.assert_close(gae_advantages(rewards, values, mask, 0.5, 1.0), t([-0.25, -0.1, 0.3]).view(1, 3))
    # a completion that ends after one token: the values of the padded steps are ignored
    short = gae_advantages(t([2.0, 0.0, 0.0]).view(1, 3), t([1.0, 9.0, 9.0]).view(1, 3), t([1.0, 0.0, 0.0]).view(1, 3), 1.0, 0.5)
    torch.testing.assert_close(short, t([1.0, 0.0, 0.0]).view(1, 3))  # delta_0 = 2 + 0 - 1


# ============================================================================================ DPO family
# beta = 0.5 and h = 2 ln 3, so beta h = ln 3:  -log sigmoid(ln 3) = log(1 + 1/3) = log(4/3),
# -log sigmoid(-ln 3) = log(1 + 3) = log 4
H = 2 * LN3


def test_dpo_sigmoid_loss():
    loss = dpo_losses(t([H, 0.0]), t([1.0, 1.0]), beta=0.5)
    torch.testing.assert_close(loss, t([math.log(4 / 3), LN2]))  # h = 0: -log(1/2) = log 2
    # the margin from log-probs: h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
    logp_w, ref_w, logp_l, ref_l = -3.0, -3.0 - LN3, -5.0, -5.0 + LN3
    h = (logp_w - ref_w) - (logp_l - ref_l)
    assert h == pytest.approx(H)


def test_dpo_soft_labels_and_label_smoothing():
    # label smoothing eps = 0.1, hard label: q = 0.9;  0.9 log(4/3) + 0.1 log 4
    got = dpo_losses(t([H]), t([1.0]), beta=0.5, label_smoothing=0.1)
    assert float(got) == pytest.approx(0.9 * math.log(4 / 3) + 0.1 * math.log(4))
    # a soft label p = 0.75, eps = 0: q = 0.75
    got = dpo_losses(t([H]), t([0.75]), beta=0.5)
    assert float(got) == pytest.approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4))
    # both: q = 0.8 * 0.75 + 0.2 * 0.25 = 0.65
    got = dpo_losses(t([H]), t([0.75]), beta=0.5, label_smoothing=0.2)
    assert float(got) == pytest.approx(0.65 * math.log(4 / 3) + 0.35 * math.log(4))
    # p = 1/2 (a tie): the loss is symmetric in h
    a, b = dpo_losses(t([H, -H]), t([0.5, 0.5]), beta=0.5)
    assert float(a) == pytest.approx(float(b))


def test_ipo_loss():
    # beta = 0.5: target margin 1 / (2 beta) = 1
    got = dpo_losses(t([3.0, 1.0, 0.0]), t([1.0, 1.0, 1.0]), beta=0.5, loss_type="ipo")
    torch.testing.assert_close(got, t([(3 - 1) ** 2, 0.0, 1.0]))
    # eps = 0.1, h = 3: 0.9 (3 - 1)^2 + 0.1 (-3 - 1)^2 = 3.6 + 1.6
    got = dpo_losses(t([3.0]), t([1.0]), beta=0.5, loss_type="ipo", label_smoothing=0.1)
    assert float(got) == pytest.approx(5.2)


def test_hinge_loss():
    # beta = 0.5: max(0, 1 - 0.5 h)
    got = dpo_losses(t([1.0, 4.0, -2.0]), t([1.0, 1.0, 1.0]), beta=0.5, loss_type="hinge")
    torch.testing.assert_close(got, t([0.5, 0.0, 2.0]))
    # eps = 0.1, h = 1: 0.9 * 0.5 + 0.1 * max(0, 1 + 0.5) = 0.45 + 0.15
    got = dpo_losses(t([1.0]), t([1.0]), beta=0.5, loss_type="hinge", label_smoothing=0.1)
    assert float(got) == pytest.approx(0.6)


def test_kto_reference_point_z0():
    # mismatched pairs' log-ratios [0.5, 0.2, 0.3]: z0 = mean = 1/3
    logp = t([-2.0, -3.0, -1.0]).requires_grad_(True)
    z0 = kto_z0(logp, t([-2.5, -3.2, -1.3]))
    assert float(z0) == pytest.approx(1 / 3)
    assert not z0.requires_grad  # detached: no gradient flows through the reference point
    # a negative estimate is clipped at 0: log-ratios [-0.5, 0.2], mean -0.15 -> 0
    assert float(kto_z0(t([-1.0, -1.0]), t([-0.5, -1.2]))) == 0.0


def test_kto_loss():
    # beta = 0.5, z0 = 0.2, lambda_D = 1, lambda_U = 2
    # desirable r = 2.2:    1 * (1 - sigmoid(0.5 * (2.2 - 0.2))) = 1 - sigmoid(1) = 1 / (1 + e)
    # undesirable r = -1.8: 2 * (1 - sigmoid(0.5 * (0.2 + 1.8))) = 2 / (1 + e)
    got = kto_losses(t([2.2, -1.8]), torch.tensor([True, False]), torch.tensor(0.2, dtype=torch.float64), beta=0.5,
                     desirable_weight=1.0, undesirable_weight=2.0)
    torch.testing.assert_close(got, t([1 / (1 + math.e), 2 / (1 + math.e)]))
    # at r = z0 both losses are lambda / 2
    got = kto_losses(t([0.2, 0.2]), torch.tensor([True, False]), torch.tensor(0.2, dtype=torch.float64), beta=0.5,
                     desirable_weight=1.0, undesirable_weight=2.0)
    torch.testing.assert_close(got, t([0.5, 1.0]))


# ============================================================================================ Nash-MD
def test_geometric_mixture():
    logp, ref = torch.log(t([0.5, 0.25, 0.25])), torch.log(t([0.25, 0.25, 0.5]))
    # beta = 1/2: pi^mu ∝ sqrt(pi pi_ref) = [2^-1.5, 2^-2, 2^-1.5];  Z = 2 * 2^-1.5 + 1/4 = 1/sqrt(2) + 1/4
    z = 1 / math.sqrt(2) + 0.25
    want = t([2 ** -1.5 / z, 0.25 / z, 2 ** -1.5 / z])
    torch.testing.assert_close(geometric_mixture_logprobs(logp, ref, 0.5).exp(), want)
    # beta = 0: pi itself; beta = 1: pi_ref itself
    torch.testing.assert_close(geometric_mixture_logprobs(logp, ref, 0.0).exp(), t([0.5, 0.25, 0.25]))
    torch.testing.assert_close(geometric_mixture_logprobs(logp, ref, 1.0).exp(), t([0.25, 0.25, 0.5]))
    # beta = 1/4 on [1/2, 1/2] vs [1/8, 7/8] : pi^mu ∝ [0.5^0.75 * 0.125^0.25, 0.5^0.75 * 0.875^0.25]
    a, b = 0.5 ** 0.75 * 0.125 ** 0.25, 0.5 ** 0.75 * 0.875 ** 0.25
    got = geometric_mixture_logprobs(torch.log(t([0.5, 0.5])), torch.log(t([0.125, 0.875])), 0.25).exp()
    torch.testing.assert_close(got, t([a / (a + b), b / (a + b)]))


def test_nash_md_loss():
    # two samples: row 0 of 2 tokens, row 1 of 1 token (+ padding, log-probs 0); kl_coef = 0.1
    logp = t([-1.0, -2.0], [-0.5, 0.0]).requires_grad_(True)
    ref = t([-1.5, -1.0], [-1.0, 0.0])
    p = t(0.9, 0.2)
    # log-ratios: row 0 [0.5, -1], row 1 [0.5, 0]
    # KL surrogate: row 0: 0.5 * -1 + (-1) * (-2) = 1.5;  row 1: 0.5 * -0.5 = -0.25
    # (p - 1/2) sum log pi: row 0: 0.4 * -3 = -1.2;  row 1: -0.3 * -0.5 = 0.15
    # loss = mean(0.1 * 1.5 + 1.2, 0.1 * -0.25 - 0.15) = (1.35 - 0.175) / 2
    loss = nash_md_loss(logp, ref, p, 0.1)
    assert loss.item() == pytest.approx(1.175 / 2, abs=1e-12)
    loss.backward()
    # d/d log pi_t = (kl_coef * sg(log-ratio_t) - (p - 1/2)) / B
    # row 0: [(0.05 - 0.4) / 2, (-0.1 - 0.4) / 2];  row 1 (real token): (0.05 + 0.3) / 2
    torch.testing.assert_close(logp.grad[0], t([-0.175, -0.25]))
    assert float(logp.grad[1, 0]) == pytest.approx(0.175)


def test_nash_md_kl_surrogate_is_the_per_state_kl_gradient():
    """In expectation over a ~ pi(.|s), the surrogate's gradient is grad KL(pi(.|s) || pi_ref(.|s)) at a
    fixed state s (the docstring's claim): sum over the 3 actions weighted by pi, against autograd of
    the exact KL = sum_a pi(a) (log pi(a) - log pi_ref(a))."""
    theta = t([0.3, -1.0, 0.5]).requires_grad_(True)
    ref = torch.log(t([0.2, 0.5, 0.3]))
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    # p = 1/2: only the KL term; each action is a one-token sample
    surrogate = sum(pi[a] * nash_md_loss(logp[a].view(1, 1), ref[a].view(1, 1), t(0.5), 1.0) for a in range(3))
    (g_surrogate,) = torch.autograd.grad(surrogate, theta)
    logp2 = torch.log_softmax(theta, -1)
    kl = (logp2.exp() * (logp2 - ref)).sum()
    (g_kl,) = torch.autograd.grad(kl, theta)
    torch.testing.assert_close(g_surrogate, g_kl)


# ============================================================================================ ReST
def test_rest_normalisation():
    # lo = -1, hi = 1: (r + 1) / 2 clipped to [0, 1]
    got = normalise_rewards(np.array([-1.0, 0.0, 0.5, 1.0, 3.0, -2.0]), -1.0, 1.0)
    np.testing.assert_allclose(got, [0.0, 0.5, 0.75, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(normalise_rewards(np.array([0.3, 0.3]), 0.3, 0.3), [1.0, 1.0])  # no spread


def test_rest_filter_with_rising_thresholds():
    r = np.array([0.1, 0.75, 0.95, 0.7, 0.8, 0.99])
    kept = [rest_filter(r, tau).tolist() for tau in (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)]
    assert kept == [[0, 1, 2, 3, 4, 5],  # tau = 0: everything (plain BC)
                    [1, 2, 3, 4, 5],     # R >= 0.7 (0.7 itself is kept)
                    [2, 4, 5],           # R >= 0.8
                    [2, 5],              # R >= 0.9
                    [2, 5],              # R >= 0.95
                    [5]]                 # R >= 0.99
    assert rest_filter(r, 0.995).tolist() == []
    # quantile mode: tau is a quantile of the rewards. [0.1 .. 0.5]: median 0.3 -> keep 3 of 5;
    # the 0.75-quantile (linear, position 0.75 * 4 = 3) is 0.4 -> keep 2
    q = np.array([0.5, 0.1, 0.4, 0.2, 0.3])
    assert rest_filter(q, 0.5, "quantile").tolist() == [0, 2, 4]
    assert rest_filter(q, 0.75, "quantile").tolist() == [0, 2]


def test_rest_bc_loss_is_the_nll_per_token():
    # tokens: [-1, -2] and [-3, (pad)]: -(-1 - 2 - 3) / 3 = 2
    assert float(bc_loss(t([-1.0, -2.0], [-3.0, 0.0]), t([1.0, 1.0], [1.0, 0.0]))) == pytest.approx(2.0)


# ============================================================================================ REINFORCE / RLOO
def test_rloo_leave_one_out_baseline():
    # k = 2: each sample's baseline is the other one: [1 - 3, 3 - 1, 5 - 5, 5 - 5]
    torch.testing.assert_close(leave_one_out_advantages(t([1.0, 3.0, 5.0, 5.0]), 2), t([-2.0, 2.0, 0.0, 0.0]))
    # k = 4, rewards [1, 2, 3, 6] (sum 12): baselines (12 - R_i) / 3 = [11/3, 10/3, 3, 2]
    torch.testing.assert_close(leave_one_out_advantages(t([1.0, 2.0, 3.0, 6.0]), 4), t([-8 / 3, -4 / 3, 0.0, 4.0]))


def _rollout(rewards, ref_logprobs, mask, env_kl_coef):
    b = len(rewards)
    return EnvRollout([""] * b, [[1]] * b, torch.zeros(b, 2, dtype=torch.long), torch.tensor(mask), torch.zeros(b, 2),
                      [""] * b, torch.ones(b, dtype=torch.bool), torch.tensor(rewards), torch.tensor(ref_logprobs),
                      torch.zeros(b), np.full(b, np.nan), env_kl_coef)


def test_reinforce_reward_and_loss():
    # The env pays r_t = beta_env * log pi_ref(a_t|s_t), + RM on the last step; the agent adds -beta log pi.
    # beta = beta_env = 0.1, log pi_ref: row 0 [-1.5, -1.5], row 1 [-2, (pad) 0]; RM 1.0 and 0.5
    ref = [[-1.5, -1.5], [-2.0, 0.0]]
    env_rewards = [[-0.15, -0.15 + 1.0], [-0.2 + 0.5, 0.0]]
    roll = _rollout(env_rewards, ref, [[1, 1], [1, 0]], 0.1)
    logp = t([-1.0, -2.0], [-1.0, 0.0])
    # R = RM - beta * sum_t (log pi - log pi_ref): row 0 log-ratios [0.5, -0.5] -> R = 1.0; row 1 [1] -> 0.5 - 0.1
    torch.testing.assert_close(roll.kl_rewards(logp, 0.1).sum(1), t(1.0, 0.4))
    # an agent with its own beta = 0.3 re-weights the env's log pi_ref term: R = RM - 0.3 * sum(log-ratios)
    torch.testing.assert_close(roll.kl_rewards(logp, 0.3).sum(1), t(1.0, 0.5 - 0.3))
    # per token, padding is 0
    torch.testing.assert_close(roll.kl_rewards(logp, 0.1), t([-0.05, 0.05 + 1.0], [-0.1 + 0.5, 0.0]))
    # loss = -mean(A * log pi(y|x)) = -(1 * -2 + 0.5 * -4) / 2 = 2; gradient -A / B = [-0.5, -0.25]
    seq_logp = t(-2.0, -4.0).requires_grad_(True)
    loss = policy_gradient_loss(seq_logp, t(1.0, 0.5))
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(seq_logp.grad, t(-0.5, -0.25))
