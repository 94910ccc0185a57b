"""The torch reference against hand computation, and the properties docs/loss.md states."""

import math

import pytest
import torch

import rpo_fast
from rpo_fast import diffusion_dpo_loss, diffusion_rpo_loss, sft_loss, similarity_weights

LOSS_TYPES = ["sigmoid", "hinge", "ipo"]


def f_scalar(x: float, loss_type: str, beta: float) -> float:
    """The per-element loss of docs/loss.md, in plain Python floats."""
    if loss_type == "sigmoid":
        return math.log1p(math.exp(-x)) if x > -30 else -x
    if loss_type == "hinge":
        return max(0.0, 1.0 - x)
    return (x / beta - 1.0 / (2.0 * beta)) ** 2


def rpo_by_hand(pred, target, ref, weights, beta, loss_type):
    """docs/loss.md's RPO formula with Python loops over nested lists of per-sample values."""
    m = len(pred) // 2
    err = [sum((p - t) ** 2 for p, t in zip(pr, tg)) / len(pr) for pr, tg in zip(pred, target)]
    ref_err = [sum((p - t) ** 2 for p, t in zip(pr, tg)) / len(pr) for pr, tg in zip(ref, target)]
    delta = [e - r for e, r in zip(err, ref_err)]
    total = 0.0
    for i in range(m):
        for j in range(m):
            z = beta * (delta[m + j] - delta[i])
            total += f_scalar(weights[i][j] * z, loss_type, beta)
    return total / (m * m)


def tensors(pred, target, ref):
    return (torch.tensor(pred, dtype=torch.float64), torch.tensor(target, dtype=torch.float64),
            torch.tensor(ref, dtype=torch.float64))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_single_pair_by_hand(loss_type):
    # e_w = 1, e_l = 4, ref_w = 2.25, ref_l = 1: dw = -1.25, dl = 3, z = beta * 4.25
    pred, target, ref = tensors([[1.0], [2.0]], [[0.0], [0.0]], [[1.5], [1.0]])
    beta = 0.5
    expected = f_scalar(beta * 4.25, loss_type, beta)
    loss = diffusion_dpo_loss(pred, target, ref, beta=beta, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rpo_two_pairs_explicit_weights_by_hand(loss_type):
    pred = [[0.3, -0.2], [1.0, 0.5], [0.2, 0.1], [-0.7, 0.4]]
    target = [[0.0, 0.1], [0.9, 0.3], [0.4, 0.0], [-0.1, 0.2]]
    ref = [[0.2, -0.1], [1.2, 0.4], [0.1, 0.3], [-0.5, 0.1]]
    weights = [[0.7, 0.3], [0.2, 0.8]]
    beta = 3.0
    expected = rpo_by_hand(pred, target, ref, weights, beta, loss_type)
    p, t, r = tensors(pred, target, ref)
    loss = diffusion_rpo_loss(p, t, r, weights=torch.tensor(weights, dtype=torch.float64), beta=beta, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_sft_by_hand():
    pred, target, _ = tensors([[1.0, 2.0], [3.0, 0.0], [9.0, 9.0], [9.0, 9.0]], [[0.0, 0.0]] * 4, [[0.0, 0.0]] * 4)
    # winners only: (1 + 4) / 2 = 2.5 and (9 + 0) / 2 = 4.5 -> mean 3.5
    assert sft_loss(pred, target).item() == pytest.approx(3.5)


def test_metrics_by_hand():
    # two pairs: z_00 = beta * (dl_0 - dw_0), z_11 = beta * (dl_1 - dw_1)
    pred, target, ref = tensors([[1.0], [0.0], [2.0], [0.0]], [[0.0]] * 4, [[0.0], [0.0], [0.0], [0.0]])
    # errors: [1, 0, 4, 0]; ref errors 0 -> dw = [1, 0], dl = [4, 0]; z = beta*[3, 0]
    beta = 2.0
    _, metrics = diffusion_rpo_loss(pred, target, ref, beta=beta, return_metrics=True)
    assert metrics["implicit_acc"].item() == pytest.approx((1.0 + 0.5) / 2)  # z=0 counts half
    assert metrics["reward_margin"].item() == pytest.approx((3.0 + 0.0) / 2)
    assert metrics["model_mse"].item() == pytest.approx(5.0 / 4)
    assert metrics["ref_mse"].item() == pytest.approx(0.0)
    # weight_norm "mean" (the default): uniform weights 1, so a pair's own logit has beta itself
    assert metrics["weight_diag"].item() == pytest.approx(1.0) and metrics["effective_beta"].item() == pytest.approx(2.0)
    _, row = diffusion_rpo_loss(pred, target, ref, beta=beta, weight_norm="row", return_metrics=True)
    assert row["weight_diag"].item() == pytest.approx(0.5) and row["effective_beta"].item() == pytest.approx(1.0)
    _, dpo_metrics = diffusion_dpo_loss(pred, target, ref, beta=beta, return_metrics=True)
    assert set(dpo_metrics) == {"implicit_acc", "reward_margin", "model_mse", "ref_mse", "effective_beta"}
    assert dpo_metrics["effective_beta"].item() == beta
    assert all(v.dim() == 0 and not v.requires_grad for v in dpo_metrics.values())


def random_batch(m, shape=(3, 4, 5), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * m, *shape, generator=gen, dtype=dtype)
    ref = target + torch.randn(2 * m, *shape, generator=gen, dtype=dtype)
    pred = ref + 0.1 * torch.randn(2 * m, *shape, generator=gen, dtype=dtype)
    emb = torch.randn(2 * m, 6, generator=gen, dtype=dtype)
    return pred, target, ref, emb[:m], emb[m:]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rpo_with_one_pair_equals_dpo(loss_type):
    pred, target, ref, emb_w, emb_l = random_batch(1)
    dpo = diffusion_dpo_loss(pred, target, ref, beta=50.0, loss_type=loss_type)
    for kwargs in ({}, {"emb_w": emb_w, "emb_l": emb_l}):
        rpo = diffusion_rpo_loss(pred, target, ref, beta=50.0, loss_type=loss_type, **kwargs)
        torch.testing.assert_close(rpo, dpo, rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("weight_norm,weight", [("mean", 1.0), ("row", 0.2)])
def test_rpo_without_weights_is_uniform(loss_type, weight_norm, weight):
    m = 5
    pred, target, ref, _, _ = random_batch(m)
    uniform = torch.full((m, m), weight, dtype=torch.float64)  # mean: 1 (average 1); row: 1/M (rows sum to 1)
    implicit = diffusion_rpo_loss(pred, target, ref, beta=50.0, loss_type=loss_type, weight_norm=weight_norm)
    explicit = diffusion_rpo_loss(pred, target, ref, weights=uniform, beta=50.0, loss_type=loss_type)
    torch.testing.assert_close(implicit, explicit, rtol=1e-12, atol=0)


@pytest.mark.parametrize("weight_norm,scale", [("mean", 4.0), ("row", 1.0)])
def test_embedding_weights_match_similarity_weights(weight_norm, scale):
    m = 4
    pred, target, ref, emb_w, emb_l = random_batch(m)
    weights = similarity_weights(emb_w, emb_l, tau=0.3)
    cos = torch.nn.functional.cosine_similarity(emb_w[:, None, :], emb_l[None, :, :], dim=-1)
    torch.testing.assert_close(weights, torch.softmax(cos / 0.3, dim=1))
    torch.testing.assert_close(weights.sum(1), torch.ones(m, dtype=torch.float64))
    a = diffusion_rpo_loss(pred, target, ref, emb_w=emb_w, emb_l=emb_l, tau=0.3, beta=50.0, weight_norm=weight_norm)
    b = diffusion_rpo_loss(pred, target, ref, weights=weights * scale, beta=50.0)  # explicit: used as given
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def llm_rpo_trainer_loss(e_model, e_ref, emb, tau, beta):
    """The paired RPO loss of the LLM RPO trainer (Yin et al. 2024, trainers.py, RPOTrainer),
    written out again for diffusion: a sample's log-probability ratio is minus its error
    difference (Diffusion-DPO), logits_ij = ratio_w_i - ratio_l_j, weights a row softmax of
    -(1 - cos)/tau over the prompts' embeddings, or ones without embeddings; the loss the
    mean over i of the mean over j of -log sigmoid(beta * w_ij * logits_ij)."""
    m = len(e_model) // 2
    ratio = -(e_model - e_ref)
    logits = ratio[:m, None] - ratio[None, m:]
    if emb is None:
        weights = torch.ones_like(logits)
    else:
        unit = torch.nn.functional.normalize(emb, dim=1)
        weights = torch.softmax(-(1 - unit @ unit.T) / tau, dim=1)
    return -torch.nn.functional.logsigmoid(beta * logits * weights).mean(-1).mean()


def test_the_llm_rpo_trainers_loss():
    """Its definition, per convention: with prompt embeddings it is weight_norm "row" (its
    softmax rows sum to 1); without, its weights are ones, weight_norm "mean"'s uniform."""
    m = 6
    pred, target, ref, emb, _ = random_batch(m)
    e_model = (pred - target).pow(2).flatten(1).mean(1)
    e_ref = (ref - target).pow(2).flatten(1).mean(1)
    want = llm_rpo_trainer_loss(e_model, e_ref, emb, tau=0.5, beta=40.0)
    got = diffusion_rpo_loss(pred, target, ref, emb_w=emb, emb_l=emb, tau=0.5, beta=40.0, weight_norm="row")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    want = llm_rpo_trainer_loss(e_model, e_ref, None, tau=0.5, beta=40.0)
    torch.testing.assert_close(diffusion_rpo_loss(pred, target, ref, beta=40.0), want, rtol=1e-12, atol=0)


def test_weight_norm_mean_gives_a_pair_dpos_strength():
    """At the start of training (policy = reference) every logit is 0. With uniform weights,
    RPO under weight_norm "mean" pulls on every sample as DPO does at the same beta; under
    "row" with 1/M of it: the trap of carrying a DPO beta over to row-normalized weights."""
    m = 8
    _, target, ref, _, _ = random_batch(m)

    def grad(loss_fn, **kwargs):
        pred = ref.clone().requires_grad_(True)
        loss_fn(pred, target, ref, beta=2500.0, **kwargs).backward()
        return pred.grad

    dpo = grad(diffusion_dpo_loss)
    torch.testing.assert_close(grad(diffusion_rpo_loss), dpo, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad(diffusion_rpo_loss, weight_norm="row"), dpo / m, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(method, loss_type):
    pred, target, ref, emb_w, emb_l = random_batch(3, shape=(2, 3))
    pred.requires_grad_(True)

    def fn(p):
        if method == "sft":
            return sft_loss(p, target)
        if method == "dpo":
            return diffusion_dpo_loss(p, target, ref, beta=20.0, loss_type=loss_type)
        return diffusion_rpo_loss(p, target, ref, emb_w=emb_w, emb_l=emb_l, beta=20.0, loss_type=loss_type)

    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-7)


def test_gradient_formula_per_sample_coefficient():
    """dL/dpred[k] = g_k * 2 (pred[k] - target[k]) / D, with g_k = dL/de_k."""
    pred, target, ref, emb_w, emb_l = random_batch(3)
    pred.requires_grad_(True)
    loss = diffusion_rpo_loss(pred, target, ref, emb_w=emb_w, emb_l=emb_l, beta=30.0)
    (grad,) = torch.autograd.grad(loss, pred)
    direction = 2 * (pred - target).detach() / pred[0].numel()
    g = (grad.flatten(1) * direction.flatten(1)).sum(1) / direction.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(grad, g.view(-1, 1, 1, 1) * direction)


def test_gradients_reach_model_pred_only():
    pred, target, ref, emb_w, emb_l = random_batch(3)
    leaves = [t.clone().requires_grad_(True) for t in (pred, target, ref, emb_w, emb_l)]
    loss = diffusion_rpo_loss(leaves[0], leaves[1], leaves[2], emb_w=leaves[3], emb_l=leaves[4], beta=10.0)
    loss.backward()
    assert leaves[0].grad is not None and leaves[0].grad.abs().sum() > 0
    assert all(t.grad is None for t in leaves[1:])
    ref_err = (ref - target).pow(2).flatten(1).mean(1).requires_grad_(True)
    weights = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    diffusion_rpo_loss(leaves[0], target, ref_err=ref_err, weights=weights, beta=10.0).backward()
    assert ref_err.grad is None and weights.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_large_beta_stays_finite(dtype, loss_type):
    """beta = 5000 with per-sample errors differing by 1: |z| = 5000, far past exp's range."""
    target = torch.zeros(4, 2, 2, dtype=dtype)
    # winners' error 0 and 1, losers' error 1 and 0: dl - dw = +-1
    pred = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, 2)]).to(dtype)
    ref = torch.zeros_like(pred)
    for fn in (diffusion_rpo_loss, diffusion_dpo_loss):
        p = pred.clone().requires_grad_(True)
        loss = fn(p, target, ref, beta=5000.0, loss_type=loss_type)
        loss.backward()
        assert torch.isfinite(loss), (fn.__name__, loss)
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("poison", ["nan_pred", "inf_target", "inf_ref", "inf_weights", "nan_emb", "inf_ref_err"])
def test_non_finite_inputs_give_non_finite_loss(poison):
    pred, target, ref, emb_w, emb_l = random_batch(3, dtype=torch.float32)
    weights, ref_err = None, None
    if poison == "nan_pred":
        pred[4, 0, 0, 0] = float("nan")
    elif poison == "inf_target":
        target[1, 0, 0, 0] = float("inf")
    elif poison == "inf_ref":
        ref[5, 0, 0, 0] = float("inf")  # a loser's reference: z = +inf would give a finite loss of 0
    elif poison == "inf_weights":
        emb_w = emb_l = None
        weights = torch.full((3, 3), 1.0 / 3)
        weights[0, 1] = float("inf")
    elif poison == "nan_emb":
        emb_l[2, 0] = float("nan")
    elif poison == "inf_ref_err":
        ref_err = (ref - target).pow(2).flatten(1).mean(1)
        ref_err[0] = float("inf")
        ref = None
    for loss_type in LOSS_TYPES:
        loss = diffusion_rpo_loss(pred, target, ref, ref_err=ref_err, emb_w=emb_w, emb_l=emb_l, weights=weights,
                                  beta=10.0, loss_type=loss_type)
        assert not torch.isfinite(loss), (poison, loss_type, loss)


def test_module_matches_functional():
    pred, target, ref, emb_w, emb_l = random_batch(3)
    module = rpo_fast.RPOLoss("rpo", beta=40.0, tau=0.7, loss_type="hinge")
    expected = diffusion_rpo_loss(pred, target, ref, emb_w=emb_w, emb_l=emb_l, beta=40.0, tau=0.7, loss_type="hinge")
    torch.testing.assert_close(module(pred, target, ref, emb_w=emb_w, emb_l=emb_l), expected)
    torch.testing.assert_close(rpo_fast.RPOLoss("dpo", beta=40.0)(pred, target, ref), diffusion_dpo_loss(pred, target, ref, beta=40.0))
    torch.testing.assert_close(rpo_fast.RPOLoss("sft")(pred, target), sft_loss(pred, target))
    assert "method='rpo'" in repr(module) and "weight_norm='mean'" in repr(module)
    row = rpo_fast.RPOLoss("rpo", beta=40.0, weight_norm="row")
    torch.testing.assert_close(row(pred, target, ref), diffusion_rpo_loss(pred, target, ref, beta=40.0, weight_norm="row"))


def test_available_backends_lists_torch():
    backends = rpo_fast.available_backends()
    assert backends[0] == "torch"
    assert set(backends) <= {"torch", "cpu", "cuda", "triton"}
