"""plan.compile: operator fusion by torch.compile (inductor), per transformer block or per model/stage.

Example:
    >>> engine = plait.boost(model, ..., plan=plait.Plan(dp=2, zero=3, compile="blocks"))
"""

from plait.compile.apply import CompiledUnits, apply_compile, compile_blocks, compile_module, compile_whole
from plait.compile.available import COMPILE_MODES, check_compile_available, check_compile_mode, missing_compiler
from plait.compile.report import CompileStats

__all__ = [
    "COMPILE_MODES",
    "CompileStats",
    "CompiledUnits",
    "apply_compile",
    "check_compile_available",
    "check_compile_mode",
    "compile_blocks",
    "compile_module",
    "compile_whole",
    "missing_compiler",
]
