"""Whether torch.compile can generate code here: inductor's C++ backend on CPU, Triton on CUDA.

Checked before any collective, so a missing compiler stops every rank with one line
instead of failing inside the first step.
"""

from __future__ import annotations

import shutil

from plait.config import COMPILE_MODES


def check_compile_mode(mode: str) -> None:
    """Refuse an unknown plan.compile value, listing the valid ones."""
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"plan.compile={mode!r}: choose one of {', '.join(COMPILE_MODES)} (off: eager; blocks: torch.compile "
            "each transformer block; full: the whole model, or each pipeline stage)"
        )


def missing_compiler(device_type: str) -> str | None:
    """What inductor lacks to compile for `device_type` (None when it can compile)."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton (inductor's GPU code generator) is not installed"
    return _missing_cpp_compiler()


def _missing_cpp_compiler() -> str | None:
    from torch._inductor import cpp_builder

    try:  # inductor's own discovery: config.cpp.cxx, then $CXX, then g++/clang++ on PATH
        compiler = cpp_builder.get_cpp_compiler()
    except Exception as error:  # inductor raises several kinds when none is found
        return f"no C++ compiler for inductor's CPU backend was found ({error})"
    if shutil.which(compiler) is None:
        return f"inductor's C++ compiler {compiler!r} is not on PATH"
    if not cpp_builder.get_compiler_version_info(compiler):
        return f"inductor's C++ compiler {compiler!r} does not run ({compiler} --version fails)"
    return None


def check_compile_available(mode: str, *, device_type: str) -> None:
    """Refuse plan.compile when this machine cannot compile for `device_type`, saying what to install."""
    check_compile_mode(mode)
    if mode == "off":
        return
    missing = missing_compiler(device_type)
    if missing is not None:
        fix = "install Triton" if device_type == "cuda" else "install g++ (or set $CXX to a C++ compiler)"
        raise ValueError(f"plan.compile={mode!r} on {device_type}: {missing}; {fix}, or set plan.compile='off'")
