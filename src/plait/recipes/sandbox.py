"""Running untrusted code (a model's completed function body and its doctests) in a sandboxed subprocess.

Each program runs in a fresh ``python -I`` process (isolated: no site-packages of the user, no PYTHON*
variables, no current directory on sys.path) in a new temporary working directory, with
- resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), written file size (RLIMIT_FSIZE),
  no core files; and a wall-clock timeout after which the process group is killed;
- an audit hook installed before the program runs that refuses sockets (no network), new processes
  (subprocess, os.system, exec, fork) and any file write, removal or rename outside the working directory;
- stdout and stderr captured and capped.
The child writes its verdict as one line starting with a random nonce of this run (sent on stdin, never in its
globals) and exits at once (os._exit: no atexit handler or finalizer of the program runs after it); a line
the program prints cannot carry the nonce, so it is never read as a verdict; no nonce line (a crash, a kill,
the program exiting first) is scored from the exit. Not covered: a program that patches the doctest runner
or walks the interpreter's frames in its own process (the doctests run there).
"""

from __future__ import annotations

import ast
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# The child: an audit hook, then the program (stdin: JSON {"source", "entry"}), then doctest of `entry`.
_CHILD = r"""
import sys, os, json
root = os.getcwd()
def _inside(path):
    try:
        full = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else root)
    except Exception:
        return False
    return full == root or full.startswith(root + os.sep)
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.spawn", "pty.", "ctypes.")
WRITES = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.chmod", "os.symlink", "os.link")
def hook(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1] or "r", args[2] or 0
        writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and not _inside(args[0]):
            raise PermissionError("sandbox: writing outside the working directory")
    if event in WRITES and args and not _inside(args[0]):
        raise PermissionError("sandbox: " + event + " outside the working directory")
import doctest
class Runner(doctest.DocTestRunner):
    errors = 0
    def report_unexpected_exception(self, out, test, example, exc_info):
        self.errors += 1
def main(request, write, dumps, exit):
    nonce = request.pop("nonce")  # held only in this frame: the verdict line must start with it
    source, entry = request.pop("source"), request.pop("entry")
    sys.addaudithook(hook)
    verdict = {"parsed": False, "defined": False, "examples": 0, "failed": 0, "errors": 0}
    try:
        code = compile(source, "<completion>", "exec")
        verdict["parsed"] = True
        namespace = {"__name__": "__sandbox__"}
        exec(code, namespace)
        verdict["defined"] = entry in namespace
        if verdict["defined"]:
            runner = Runner(verbose=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            for test in doctest.DocTestFinder(recurse=False).find(namespace[entry], entry, globs=namespace):
                result = runner.run(test, out=lambda text: None)
                verdict["examples"] += result.attempted
                verdict["failed"] += result.failed
            verdict["errors"] = runner.errors
    except BaseException as error:
        verdict["exception"] = type(error).__name__
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    write(1, ("\n" + nonce + " " + dumps(verdict) + "\n").encode())
    exit(0)  # at once: no atexit handler, finalizer or thread of the program runs after the verdict
main(json.loads(sys.stdin.read()), os.write, json.dumps, os._exit)
"""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 2
    wall_s: float = 5.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    output_chars: int = 4000

    def __post_init__(self) -> None:
        if self.cpu_s < 1 or self.wall_s <= 0:
            raise ValueError(f"cpu_s={self.cpu_s}, wall_s={self.wall_s}: give the sandbox at least 1 CPU second")


@dataclass(frozen=True)
class Verdict:
    parsed: bool
    defined: bool
    examples: int  # doctest examples attempted
    failed: int  # examples whose output differed or raised
    errors: int  # examples that raised
    status: str  # ok | exception | timeout | crashed
    output: str  # the child's capped stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "ok" and self.examples > 0 and self.failed == 0


def _limit(limits: SandboxLimits) -> None:
    os.setsid()  # its own process group, killed whole on timeout
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_sandboxed(source: str, *, entry: str, limits: SandboxLimits = SandboxLimits()) -> Verdict:
    """Execute ``source`` and the doctests of its function ``entry`` in a sandboxed subprocess."""
    nonce = secrets.token_hex(16)
    request = json.dumps({"source": source, "entry": entry, "nonce": nonce})
    with tempfile.TemporaryDirectory(prefix="plait-sandbox-") as workdir:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=workdir, env={"PATH": "/usr/bin:/bin"}, preexec_fn=lambda: _limit(limits),
        )  # fmt: skip
        try:
            out, _ = process.communicate(request.encode(), timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            return Verdict(
                parses(source), False, 0, 0, 0, "timeout", out.decode(errors="replace")[: limits.output_chars]
            )
    output = out.decode(errors="replace")
    return _verdict(output, returncode=process.returncode, cap=limits.output_chars, source=source, nonce=nonce)


def parses(source: str) -> bool:
    """Whether ``source`` is valid Python (checked here, without running it)."""
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _verdict(output: str, *, returncode: int, cap: int, source: str, nonce: str) -> Verdict:
    marked = [line for line in output.splitlines() if line.startswith(nonce + " ")]
    try:
        report = json.loads(marked[0][len(nonce) + 1 :]) if returncode == 0 and len(marked) == 1 else None
    except json.JSONDecodeError:
        report = None
    output = "\n".join(line for line in output.splitlines() if not line.startswith(nonce))
    if report is None:  # killed (CPU limit, memory) or the interpreter died
        return Verdict(parses(source), False, 0, 0, 0, "crashed", output[:cap])
    status = "exception" if "exception" in report else "ok"
    return Verdict(
        report["parsed"],
        report["defined"],
        report["examples"],
        report["failed"],
        report["errors"],
        status,
        output[:cap],
    )


def graded_reward(verdict: Verdict) -> float:
    """The graded reward: 1.0 doctests pass; 0.5 the function is defined and its examples run without raising
    (some outputs differ); 0.2 the source parses; 0.0 otherwise (syntax error, timeout, crash)."""
    if verdict.passed:
        return 1.0
    if verdict.status == "ok" and verdict.defined and verdict.errors == 0:
        return 0.5
    return 0.2 if verdict.parsed else 0.0
