"""The child process of ``benchmarks/gpu_check.py``: one step's commands, time-boxed by the parent.

    python benchmarks/gpu_worker.py COMMANDS.json RESULTS.jsonl

COMMANDS.json lists commands (``name``, ``args``, optionally ``stdout``: a file for what it prints, and
``required``: where it fails, the commands after it are not run), run one after another in this one
process. A command with ``args`` is a ``dpcompress`` command line,
run as the command line would run it (``main`` of ``dpcompress.cli``, its exit status kept): the torch
import and the CUDA start are paid once per step instead of once per command, which a dry run on a
small CPU needs to finish in about a minute. The command named ``environment`` (no ``args``) prints
the versions of the packages the check needs (an import error as one line where one is missing),
whether torch sees CUDA, the GPU and its driver, as JSON; it fails (exit status 3) where a required
package is missing, or where it has ``needs_cuda`` and torch sees no CUDA device. Each command's output goes to its
``stdout`` file and to this process's stdout (the check's log); a line per finished command is
appended to RESULTS.jsonl and synced at once, so what finished is known even when the parent kills
this process at its step's time limit.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

REQUIRED = ("torch", "numpy", "onnx", "onnxruntime", "click")  # torchvision: through dpcompress, below
OPTIONAL = ("pytest", "onnxscript")  # the GPU tests; torch's newer ONNX exporter


def _module_version(name: str) -> Dict[str, Any]:
    try:
        module = importlib.import_module(name)
    except Exception as err:  # a broken install raises more than ImportError
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    return {"version": str(getattr(module, "__version__", "unknown"))}


def _torchvision() -> Dict[str, Any]:
    """torchvision as dpcompress imports it (with its fallback for compiled ops that do not match torch)."""
    try:
        from dpcompress.tv_compat import import_torchvision

        return {"version": str(import_torchvision().__version__)}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}


def _driver_version() -> Optional[str]:
    """The NVIDIA driver's version: from NVML where nvidia-ml-py is there, else from nvidia-smi."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        return found.stdout.strip().splitlines()[0] if found.returncode == 0 and found.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _gpu() -> Optional[Dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _driver_version(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def environment() -> Dict[str, Any]:
    """Versions and devices; ``missing`` lists the required packages that do not import."""
    modules = {name: _module_version(name) for name in (*REQUIRED, *OPTIONAL)}
    modules["torchvision"] = _torchvision()
    missing = [name for name in (*REQUIRED, "torchvision") if "error" in modules[name]]
    record: Dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                              "cpu_count": os.cpu_count(), "modules": modules, "missing": missing}
    if "error" not in modules["torch"]:
        import torch

        record["cuda_available"] = torch.cuda.is_available()
        record["gpu"] = _gpu()
    return record


def _exit_status(code: Any) -> int:
    """SystemExit's code as an exit status, as the interpreter would turn it into one."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run_command(command: Dict[str, Any]) -> int:
    """One ``dpcompress`` command line (or, without ``args``, the environment report) in this process;
    returns its exit status."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            if command.get("args") is None:
                status = report_environment(bool(command.get("needs_cuda")))
            else:
                status = dpcompress(command["args"])
    except Exception:
        traceback.print_exc()
        status = 1
    text = captured.getvalue()
    sys.stdout.write(text)
    if command.get("stdout"):
        Path(command["stdout"]).write_text(text)
    return status


def report_environment(needs_cuda: bool) -> int:
    """Print the environment as JSON; 3 where what the check needs is missing."""
    found = environment()
    print(json.dumps(found, indent=2))
    return 3 if found["missing"] or (needs_cuda and not found.get("cuda_available")) else 0


def dpcompress(args: List[str]) -> int:
    """``dpcompress ARGS``: a user error is one line on stderr and exit status 2, as on the command line."""
    import click

    from dpcompress.cli import main

    try:
        main.main(args=args, prog_name="dpcompress", standalone_mode=False)
    except SystemExit as done:  # the CLI printed a user error's line and exits 2
        return _exit_status(done.code)
    except click.ClickException as err:  # bad options (standalone mode would print and exit 2 itself)
        err.show()
        return err.exit_code
    return 0


def _release_memory() -> None:
    """What one command held, freed before the next (a bench's models on the GPU)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_commands(commands_path: str, results_path: str) -> int:
    commands = json.loads(Path(commands_path).read_text())
    failures = 0
    for command in commands:
        args = command.get("args")
        print(f"$ dpcompress {' '.join(args)}" if args is not None else f"$ {command['name']}", flush=True)
        began = time.perf_counter()
        status = run_command(command)
        seconds = time.perf_counter() - began
        _release_memory()
        failures += status != 0
        with open(results_path, "a") as results:
            results.write(json.dumps({"name": command["name"], "exit": status, "seconds": round(seconds, 3)}) + "\n")
            results.flush()
            os.fsync(results.fileno())
        print(f"[{command['name']}: exit {status}, {seconds:.1f} s]", flush=True)
        if status != 0 and command.get("required"):
            print(f"[{command['name']} is required: the commands after it are not run]", flush=True)
            break
    return 1 if failures else 0


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    return run_commands(argv[0], argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
