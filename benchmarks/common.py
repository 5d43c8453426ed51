"""What every benchmark here shares: its options, the record of the machine it ran on, and its output.

Each benchmark takes the options of :func:`parser` (``--out-dir`` for its work files, ``--out`` for its JSON
record, ``--quick``, ``--seed``, ``--threads``, and ``--backend`` where it runs on one), prints its results as
a markdown table (:class:`Table`) and writes one JSON record (:class:`Record`)::

    {"benchmark": "bench_prediction", "args": {...}, "machine": {"cpu", "cores", "load_average", "date",
     "commit", ...}, "load_average_end": [...], "seconds": 12.3, "results": [...]}

``--quick`` runs the same code path at the smallest sensible size (a tiny model, a small input, few repeats):
``make bench-quick`` and tests/pipeline/test_benchmarks_quick.py run every benchmark that way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("onnxruntime", "openvino")

# The model and input of the quick modes that profile a table: 10 convs at 32x32 profile in seconds.
QUICK_SPEC = "dpcompress.zoo:tiny_mobilenet_v2"
QUICK_SIZE = 32


def parser(doc: str, name: str, *, backend: bool = False, threads: Optional[int] = None) -> argparse.ArgumentParser:
    """The benchmark's parser with the shared options; ``name`` names its default folder out/``name``."""
    made = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    made.add_argument("--out-dir", default=None,
                      help=f"folder of the run's files (default out/{name}, out/{name}_quick with --quick)")
    made.add_argument("--out", default=None, help="the JSON record of the run (default OUT_DIR/record.json)")
    made.add_argument("--quick", action="store_true",
                      help="the same code path at the smallest sensible size: a smoke check, not a figure")
    made.add_argument("--seed", type=int, default=0, help="seed of the models' weights and of the data")
    made.add_argument("--threads", type=int, default=threads, help="backend threads (default: %(default)s)")
    if backend:
        made.add_argument("--backend", default=BACKENDS[0], choices=BACKENDS)
    made.set_defaults(benchmark=name)
    return made


def parse(made: argparse.ArgumentParser, quick: Optional[Dict[str, Any]] = None,
          argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The arguments, with ``quick``'s values in place under ``--quick``, and the folders resolved."""
    args = made.parse_args(argv)
    if args.quick and quick:
        for key, value in quick.items():
            setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = f"out/{args.benchmark}" + ("_quick" if args.quick else "")
    if args.out is None:
        args.out = str(Path(args.out_dir) / "record.json")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return args


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """dpcompress's commit, with +dirty where dpcompress/ has changes not committed."""
    def git(*words: str) -> str:
        try:
            return subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD")
    return (head or "unknown") + ("+dirty" if git("status", "--porcelain", "dpcompress") else "")


def load_average() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> Dict[str, Any]:
    """The machine and its state as a run begins: every result is read against it."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load_average(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
            "host": platform.node(), "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


class Record:
    """The run's JSON record at ``args.out``: written again by each :meth:`write`, so that an interrupted run
    leaves what it had."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.machine = machine()
        self.began = time.perf_counter()
        m = self.machine
        print(f"<!-- {args.benchmark}{' --quick' if args.quick else ''}: {m['cpu']}, {m['cores']} cores, load "
              f"average {m['load_average'][0]:.2f}, {m['date']}, dpcompress {m['commit']} -->", flush=True)

    def write(self, results: Any) -> Path:
        record = {"benchmark": self.args.benchmark, "args": vars(self.args), "machine": self.machine,
                  "load_average_end": load_average(), "seconds": round(time.perf_counter() - self.began, 1),
                  "results": results}
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(record, indent=1, default=str) + "\n")
        partial.replace(path)
        return path


class Table:
    """A markdown table printed a row at a time (a long benchmark shows each result as it comes)."""

    def __init__(self, head: Sequence[str], *, show: bool = True) -> None:
        self.lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        self.show = show
        if show:
            print("\n".join(self.lines), flush=True)

    def row(self, cells: Sequence[Any]) -> None:
        line = "| " + " | ".join(str(cell) for cell in cells) + " |"
        self.lines.append(line)
        if self.show:
            print(line, flush=True)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def seeded_traced(spec: str, shape: Sequence[int], seed: int = 0) -> Tuple[Any, Any]:
    """The model a spec names, in eval mode, with the weights ``torch.manual_seed(seed)`` gives, and its trace."""
    import torch

    from dpcompress.graph.trace import trace_model
    from dpcompress.models import build_model

    torch.manual_seed(seed)
    model = build_model(spec, None).eval()
    return model, trace_model(model, tuple(shape), spec=spec)


def rebuilt_original(model: Any, shape: Sequence[int]) -> Any:
    """``model`` rebuilt as a plan's network is (``unchanged_network``): what a bench compares a plan with."""
    from dpcompress.graph.rewrite import unchanged_network
    from dpcompress.graph.trace import trace_model

    return unchanged_network(trace_model(model.eval(), tuple(shape)))


def model_spec(name: str) -> str:
    """A torchvision name (``resnet18``) as its spec; a full spec (``timm:NAME``, ``file.py:factory``) as given."""
    return name if ":" in name else f"torchvision:{name}"
