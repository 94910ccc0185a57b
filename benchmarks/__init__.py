"""rpo-fast's benchmarks, one script per question, sharing harness.py (docs/benchmarks.md):
loss.py (``make bench``), step.py (``make bench-step``), quality.py (``make bench-quality``),
gpu_check.py (``make gpu-check``) and step_timing.py (its step-component stage)."""
