"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter in CI: the variable must be set
before triton is first imported. torch.compile's on-disk cache goes to a fresh folder per test
session: its keys ignore the schemas of custom ops, so graphs cached by an older checkout on
the same machine would call this checkout's ops with the old arguments.
"""

import os
import tempfile

import torch  # (does not import triton: the interpreter switch below still takes effect)

# Triton kernels run on CPU tensors through the interpreter only where no GPU is present; on a
# GPU machine the triton tests compile and launch the real kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rpo-fast-inductor-"))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tiny SD1.5-like / SDXL-like pipelines saved once per session (benchmarks/tiny_models.py), for the tests
# that load models through the real from_pretrained code (training, export and reload).
@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    from benchmarks.tiny_models import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from benchmarks.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


# Tiny SD3-like / FLUX.1-like flow-matching pipelines (T5 + CLIP text encoders, 16-channel VAE).
@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from benchmarks.tiny_models import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    from benchmarks.tiny_models import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def short_pretrained_base(tmp_path_factory):
    """The demo's base pretrained for 2 steps through the real pretraining code (quality is not
    the point), for the demo and quality-benchmark tests."""
    from rpo_fast.demo import base_model

    root = tmp_path_factory.mktemp("demo_base")
    config = base_model.PretrainConfig(steps=2, batch_size=4, per_scene=1)
    return base_model.pretrain(root / "base", root / "work", config, progress=False)
