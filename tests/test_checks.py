"""Every bad input raises before any work, with a message naming the argument."""

import pytest
import torch

import rpo_fast
from rpo_fast import diffusion_dpo_loss, diffusion_rpo_loss, sft_loss, similarity_weights


def batch(m=2, shape=(4, 3, 3)):
    t = torch.randn(2 * m, *shape)
    return t.clone(), torch.randn_like(t), t + 0.1


BAD_CASES = [
    # (description, kwargs-builder, exception, text in message)
    ("odd batch", lambda p, t, r: dict(model_pred=p[:3], target=t[:3], ref_pred=r[:3]), ValueError, "model_pred"),
    ("empty batch", lambda p, t, r: dict(model_pred=p[:0], target=t[:0], ref_pred=r[:0]), ValueError, "model_pred"),
    ("no batch dim", lambda p, t, r: dict(model_pred=p[0, 0, 0], target=t[0, 0, 0], ref_pred=r[0, 0, 0]), ValueError, "model_pred"),
    ("target shape", lambda p, t, r: dict(model_pred=p, target=t[:, :2], ref_pred=r), ValueError, "target"),
    ("ref_pred shape", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r[:, :2]), ValueError, "ref_pred"),
    ("no reference", lambda p, t, r: dict(model_pred=p, target=t), ValueError, "ref_pred"),
    ("both references", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, ref_err=torch.zeros(4)), ValueError, "ref_err"),
    ("ref_err shape", lambda p, t, r: dict(model_pred=p, target=t, ref_err=torch.zeros(3)), ValueError, "ref_err"),
    ("ref_err 2-d", lambda p, t, r: dict(model_pred=p, target=t, ref_err=torch.zeros(4, 1)), ValueError, "ref_err"),
    ("integer pred", lambda p, t, r: dict(model_pred=p.long(), target=t, ref_pred=r), TypeError, "model_pred"),
    ("integer target", lambda p, t, r: dict(model_pred=p, target=t.int(), ref_pred=r), TypeError, "target"),
    ("not a tensor", lambda p, t, r: dict(model_pred=p, target=t.tolist(), ref_pred=r), TypeError, "target"),
    ("beta zero", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, beta=0.0), ValueError, "beta"),
    ("beta negative", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, beta=-1.0), ValueError, "beta"),
    ("beta nan", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, beta=float("nan")), ValueError, "beta"),
    ("unknown loss_type", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, loss_type="logistic"), ValueError, "loss_type"),
    ("unknown backend", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, backend="metal"), ValueError, "backend"),
]

RPO_ONLY_CASES = [
    ("tau zero", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, tau=0.0), ValueError, "tau"),
    ("only emb_w", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, emb_w=torch.randn(2, 5)), ValueError, "emb_l"),
    ("only emb_l", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, emb_l=torch.randn(2, 5)), ValueError, "emb_w"),
    ("emb rows", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, emb_w=torch.randn(3, 5), emb_l=torch.randn(3, 5)), ValueError, "emb_w"),
    ("emb 1-d", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, emb_w=torch.randn(2), emb_l=torch.randn(2)), ValueError, "emb_w"),
    ("emb widths differ", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, emb_w=torch.randn(2, 5), emb_l=torch.randn(2, 6)), ValueError, "emb_l"),
    ("weights shape", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, weights=torch.rand(2, 3)), ValueError, "weights"),
    ("weights negative", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, weights=-torch.rand(2, 2)), ValueError, "weights"),
    ("weights and embeddings", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, weights=torch.rand(2, 2),
                                                     emb_w=torch.randn(2, 5), emb_l=torch.randn(2, 5)), ValueError, "weights"),
    ("integer weights", lambda p, t, r: dict(model_pred=p, target=t, ref_pred=r, weights=torch.ones(2, 2, dtype=torch.long)), TypeError, "weights"),
]


@pytest.mark.parametrize("desc,build,exc,name", BAD_CASES + RPO_ONLY_CASES, ids=[c[0] for c in BAD_CASES + RPO_ONLY_CASES])
def test_rpo_rejects_bad_input(desc, build, exc, name):
    kwargs = build(*batch())
    with pytest.raises(exc, match=name):
        diffusion_rpo_loss(**kwargs)


@pytest.mark.parametrize("desc,build,exc,name", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_dpo_rejects_bad_input(desc, build, exc, name):
    kwargs = build(*batch())
    with pytest.raises(exc, match=name):
        diffusion_dpo_loss(**kwargs)


def test_sft_rejects_bad_input():
    p, t, _ = batch()
    with pytest.raises(ValueError, match="model_pred"):
        sft_loss(p[:3], t[:3])
    with pytest.raises(ValueError, match="target"):
        sft_loss(p, t[:2])
    with pytest.raises(TypeError, match="model_pred"):
        sft_loss(p.long(), t)


def test_unavailable_backend_lists_available():
    p, t, r = batch()
    missing = [b for b in ("cuda", "triton", "cpu") if b not in rpo_fast.available_backends()]
    assert missing, "every backend is available: nothing to test here"
    with pytest.raises(ValueError, match=r"not available here; available: \['torch'"):
        diffusion_rpo_loss(p, t, r, backend=missing[0])


@pytest.mark.gpu
def test_tensors_on_different_devices_cuda():
    p, t, r = batch()
    with pytest.raises(ValueError, match="target"):
        diffusion_rpo_loss(p, t.cuda(), r)


def test_tensors_on_different_devices_meta():
    """Devices differ (cpu vs meta): rejected before any work, no GPU needed."""
    p, t, r = batch()
    with pytest.raises(ValueError, match="ref_pred"):
        diffusion_rpo_loss(p, t, r.to("meta"))
    with pytest.raises(ValueError, match="emb_w"):
        diffusion_rpo_loss(p, t, r, emb_w=torch.randn(2, 5, device="meta"), emb_l=torch.randn(2, 5, device="meta"))


def test_similarity_weights_checks():
    with pytest.raises(ValueError, match="tau"):
        similarity_weights(torch.randn(2, 3), torch.randn(2, 3), tau=-1.0)
    with pytest.raises(ValueError, match="emb_l"):
        similarity_weights(torch.randn(2, 3), torch.randn(2, 4))


def test_module_checks_hyperparameters():
    with pytest.raises(ValueError, match="method"):
        rpo_fast.RPOLoss("ppo")
    with pytest.raises(ValueError, match="beta"):
        rpo_fast.RPOLoss(beta=0)
    with pytest.raises(ValueError, match="loss_type"):
        rpo_fast.RPOLoss(loss_type="l2")
    with pytest.raises(ValueError, match=r"weight_norm: expected one of \['mean', 'row'\], got 'rows'"):
        rpo_fast.RPOLoss(weight_norm="rows")
