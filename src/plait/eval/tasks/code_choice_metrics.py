"""plait_code_choice.yaml's process_results (lm-eval loads this file by its path, beside the YAML)."""

from plait.eval.choice_pool import process_results

__all__ = ["process_results"]
