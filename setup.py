"""Builds rpo_fast and its extension rpo_fast._C (torch.utils.cpp_extension, ninja).

The C++ CPU part is always built. The CUDA part is built when a CUDA toolkit and a
CUDA-enabled torch are present; RPO_FAST_CUDA=0|1 forces either way. Unless
TORCH_CUDA_ARCH_LIST is set, CUDA code is built for compute capabilities 8.0, 8.6, 8.9, 9.0, with
PTX of 9.0 that newer GPUs compile when loading.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# What each extra needs, by name; the versions come from requirements.txt (what `make` installs).
# `pip install rpo-fast` is the loss alone (torch); rpo_fast/extras.py names the extra a
# missing module belongs to, and must list the same modules.
EXTRAS = {
    "train": ["numpy", "pillow", "safetensors", "tqdm", "PyYAML", "pyarrow", "datasets", "diffusers",
              "transformers", "peft", "accelerate", "matplotlib"],
    "eval": ["numpy", "pillow", "safetensors", "tqdm", "pyarrow", "datasets", "diffusers", "transformers", "peft",
             "accelerate", "open_clip_torch"],
}


def _pins():
    """``{lower-case name: "name==version"}`` from requirements.txt."""
    pins = {}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                pins[line.split("==")[0].strip().lower()] = line
    return pins


def _extras():
    pins = _pins()
    missing = sorted({n for names in EXTRAS.values() for n in names if n.lower() not in pins})
    if missing:
        raise SystemExit(f"setup.py: requirements.txt pins no version of {missing}")
    extras = {name: [pins[n.lower()] for n in names] for name, names in EXTRAS.items()}
    extras["all"] = sorted({r for reqs in extras.values() for r in reqs})
    return extras


def _real_cuda_home():
    """The toolkit folder. An ``nvcc`` on PATH may be a wrapper script elsewhere (as on the
    project machines), from which torch would derive a wrong CUDA_HOME and fail to link."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return os.path.realpath(home)
    return None


def _extensions():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not cpu_sources:
        return [], {}
    cuda_home = _real_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is imported
    import torch
    from torch.utils import cpp_extension

    flag = os.environ.get("RPO_FAST_CUDA", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"RPO_FAST_CUDA: expected 0 or 1, got {flag!r}")
    cuda_possible = torch.version.cuda is not None and cuda_home is not None and bool(cuda_sources)
    with_cuda = cuda_possible if flag == "" else flag == "1"
    if with_cuda and not cuda_possible:
        raise SystemExit(
            "RPO_FAST_CUDA=1 but the CUDA part cannot be built: needs a CUDA-enabled torch "
            f"(torch.version.cuda={torch.version.cuda}) and a CUDA toolkit (CUDA_HOME={cuda_home})"
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")  # PTX: newer GPUs JIT it

    # -fopenmp: at::parallel_for is inline and runs serially in code compiled without it
    # (the extension then links the libgomp that torch already loaded).
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    kwargs = dict(
        name="rpo_fast._C",
        sources=cpu_sources + (cuda_sources if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("RPO_FAST_WITH_CUDA", "1")] if with_cuda else [],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    ext = cpp_extension.CUDAExtension(**kwargs) if with_cuda else cpp_extension.CppExtension(**kwargs)
    print(f"rpo_fast: building rpo_fast._C with CUDA={'yes' if with_cuda else 'no'}"
          + (f" for {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""))
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="rpo-fast",
    version="0.1.0",
    description="Diffusion-RPO losses as fused kernels, and a lean trainer for SD1.5/SDXL",
    packages=["rpo_fast"] + [f"rpo_fast.{p}" for p in find_packages("rpo_fast")] + ["rpo_fast.kernels"],
    package_dir={"rpo_fast": "rpo_fast", "rpo_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require=_extras(),
    package_data={"rpo_fast.demo": ["base/*.json", "base/*/*"]},  # the demo's tiny pipeline
    entry_points={"console_scripts": ["rpo-fast = rpo_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
