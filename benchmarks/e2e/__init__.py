"""End-to-end training-step benchmark: rpo-fast's trainer against a Diffusion-DPO-style loop."""
