"""The sdist builds into a working install: `python -m build --sdist`, then pip installs it
into a fresh venv that sees only the already-installed torch (and the build tools), with the
CPU part of the extension only (RPO_FAST_CUDA=0, a few minutes on 2 cores). From there
`rpo-fast check` runs on the loss alone, `rpo-fast train` without the [train] extra says which
extra to install, and with the extra's packages in view a tiny `rpo-fast train` runs."""

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(torch.__file__).resolve().parents[1]  # where the installed torch lives


def _closure(names):
    """The installed distributions ``names`` need, recursively (extras left out)."""
    here = {d.metadata["Name"].lower().replace("_", "-"): d for d in md.distributions(path=[str(SITE)])}
    seen, todo, visited = {}, list(names), set()
    while todo:
        requirement = todo.pop()
        name = re.split(r"[ ;<>=!\[~]", requirement)[0].lower().replace("_", "-")
        extras = set(re.findall(r"\[([^\]]*)\]", requirement.split(";")[0])[0].split(",")) if "[" in requirement.split(";")[0] else set()
        key = (name, frozenset(e.strip() for e in extras))
        if not name or name not in here or key in visited:
            continue
        visited.add(key)
        dist = seen[name] = here[name]
        for r in dist.requires or []:
            wanted = re.findall(r'extra == "([^"]+)"', r)
            if not wanted or set(wanted) & {e.strip() for e in extras}:
                todo.append(r)
    return seen


def _link(view: Path, dists) -> None:
    """Symlinks into ``view`` the top-level files and folders of each distribution."""
    for dist in dists:
        tops = {Path(str(f)).parts[0] for f in (dist.files or []) if not str(f).startswith("..")}
        for top in tops:
            src, dst = SITE / top, view / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)


def test_sdist_installs_into_a_fresh_venv_and_trains(tmp_path, tiny_sd15_dir):
    sdist_dir = tmp_path / "dist"
    built = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check", "--outdir", str(sdist_dir), str(ROOT)])
    assert built.returncode == 0, built.stderr[-3000:]
    (sdist,) = sdist_dir.glob("rpo*fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for must in ("csrc/op_calls.h", "csrc/op_inputs.h", "csrc/rpo_math.h", "csrc/cpu/kernels.h",
                 "kernels/triton_loss.py", "rpo_fast/demo/base/unet/config.json", "requirements.txt"):
        assert must in names, must

    # A fresh venv; a .pth makes torch and the build tools visible, nothing else.
    env_dir, view = tmp_path / "venv", tmp_path / "view"
    venv.create(env_dir, with_pip=True)
    view.mkdir()
    _link(view, _closure(["torch", "setuptools", "wheel", "ninja"]).values())
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "torch-view.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")  # its .pth files too
    env = {**os.environ, "RPO_FAST_CUDA": "0", "PIP_NO_INDEX": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    # pip sees only the view: no machine-wide config (a constraints file there could swap torch), no index
    env.update(PIP_CONFIG_FILE=os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
        env.pop(name, None)
    # the venv's own (older) setuptools would shadow the one torch needs, which the view holds
    assert _run([str(py), "-m", "pip", "uninstall", "--quiet", "-y", "setuptools"], env=env).returncode == 0
    installed = _run([str(py), "-m", "pip", "install", "--quiet", "--no-build-isolation", str(sdist)], env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    cli = str(env_dir / "bin" / "rpo-fast")

    check = _run([cli, "check", "--shape", "4", "8", "8"], env=env, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "fastest correct: cpu" in check.stdout and str(env_dir) in _run(
        [str(py), "-c", "import rpo_fast._C, rpo_fast; print(rpo_fast._C.__file__)"], env=env, cwd=tmp_path).stdout

    data = tmp_path / "data"
    sys.path.insert(0, str(ROOT / "tests"))
    from train_utils import synthetic_pickapic

    synthetic_pickapic(data)
    train = [cli, "train", "--pretrained-model", str(tiny_sd15_dir), "--data", str(data), "--output-dir",
             str(tmp_path / "run"), "--latent-cache", str(tmp_path / "lat"), "--resolution", "32",
             "--batch-pairs", "2", "--max-steps", "1", "--no-compile", "--no-progress", "--method", "dpo", "--lora"]
    bare = _run(train, env=env, cwd=tmp_path)
    assert bare.returncode == 2 and 'pip install "rpo-fast[train]"' in bare.stderr, bare.stderr[-2000:]
    assert len(bare.stderr.strip().splitlines()) == 1, bare.stderr

    # The [train] extra's packages in view (those installed here, at the pins): a tiny run.
    requires = _run([str(py), "-c", "import importlib.metadata as m; print(chr(10).join(m.requires('rpo-fast')))"],
                    env=env).stdout.splitlines()
    extra = [r for r in requires if 'extra == "train"' in r]
    assert extra, "rpo-fast declares no [train] extra"
    _link(view, [d for name, d in _closure([r.split(";")[0] for r in extra]).items() if name != "rpo-fast"])
    resolved = _run([str(py), "-m", "pip", "install", "--quiet", "--no-build-isolation", "rpo-fast[train]"], env=env)
    assert resolved.returncode == 0, resolved.stderr[-3000:]  # the pins match what make installs
    trained = _run(train, env=env, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
