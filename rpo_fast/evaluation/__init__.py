"""Evaluation of a tuned model against its base: seeded generation, automatic scores, reports.

``rpo-fast eval`` (:mod:`rpo_fast.evaluation.cli`) runs :func:`evaluate`; the scorers,
generation helpers and report writers are usable on their own.
"""

from .evaluate import EvalConfig, EvalResult, EvalStage, evaluate
from .generation import GenerationSettings, read_prompts
from .report import summarize, win_rate

__all__ = ["EvalConfig", "EvalResult", "EvalStage", "GenerationSettings", "evaluate", "read_prompts", "summarize",
           "win_rate"]
