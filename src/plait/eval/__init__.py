"""`plait eval`: plait checkpoints and Hugging Face directories on EleutherAI's lm-evaluation-harness.

`PlaitLM` is the lm_eval model; plait's own tasks (perplexity, next_token, code_completion) are
local task YAMLs over the run's held-out split; `run_eval` checks, evaluates and reports.
"""

from plait.eval.runner import EvalRequest, run_eval

__all__ = ["EvalRequest", "run_eval"]
