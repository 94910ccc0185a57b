"""``import rpo_fast`` and ``rpo-fast --help`` stay light: neither torch._dynamo (seconds to
import on these machines) nor triton is imported until a call needs it."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize("what", ["import", "help"])
def test_import_and_help_load_neither_dynamo_nor_triton(what):
    code = textwrap.dedent(
        f"""
        import sys
        import rpo_fast
        if {what == "help"!r}:
            from rpo_fast.cli import main
            try:
                main(["--help"])
            except SystemExit:
                pass
        print("LOADED", "torch._dynamo" in sys.modules, "triton" in sys.modules, rpo_fast.available_backends()[:2])
        """
    )
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"}  # no interpreter: auto would not ask for triton
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("LOADED")][0]
    assert line == "LOADED False False ['torch', 'cpu']", line


def test_an_eager_loss_call_loads_neither():
    """A loss call in eager mode needs neither."""
    code = textwrap.dedent(
        """
        import sys, torch, rpo_fast
        x = torch.randn(4, 3, requires_grad=True)
        rpo_fast.diffusion_rpo_loss(x, torch.zeros(4, 3), torch.ones(4, 3), beta=1.0).backward()
        print("LOADED", "torch._dynamo" in sys.modules, "triton" in sys.modules)
        """
    )
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED False False" in done.stdout, done.stdout
