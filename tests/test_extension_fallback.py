"""Without the compiled extension, rpo_fast imports, warns once saying why, and runs on torch."""

import subprocess
import sys
import textwrap


def test_import_without_extension_warns_once_and_uses_torch():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["rpo_fast._C"] = None          # makes `import rpo_fast._C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import rpo_fast, torch
            backends = rpo_fast.available_backends()
            x = torch.randn(4, 3, requires_grad=True)
            loss = rpo_fast.diffusion_rpo_loss(x, torch.zeros(4, 3), torch.ones(4, 3), beta=1.0)
            loss.backward()
        relevant = [str(w.message) for w in caught if "rpo_fast._C" in str(w.message)]
        print(len(relevant), "cpu" in backends, "cuda" in backends, x.grad is not None)
        print(relevant[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, reason = out.stdout.strip().splitlines()[:2]
    assert first == "1 False False True"
    assert "not available" in reason and "rpo_fast._C halted" in reason  # the reason is shown
