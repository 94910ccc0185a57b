"""The rpo-fast benchmark suite (pytest-benchmark). Run it with ``make bench``.

``benchmarks/run.py`` runs the suite and writes ``benchmarks/results/<machine>.{json,md,png}``;
``benchmarks/report.py`` turns a results json into the table and plots. See docs/benchmarks.md.
"""
