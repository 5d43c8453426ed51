"""Where do predicted and measured latencies part? Per-block table rows against in-network node times.

For one model and its latency table, solves plans at several budget ratios (uniform importance),
then, with ONNX Runtime's own per-node profiler (``SessionOptions.enable_profiling``):

- runs the original and each merged network and takes every conv node's median kernel time
  (its block's cost as the network pays it) and the time of everything else (layout reorders,
  pooling, head, residual adds that were not fused);
- runs every block of those plans alone, as the table times it, and splits its session time into
  the conv node, the layout reorders at its edges and the call itself;
- times every block alone twice more, cache-hot (one session, runs back to back, as the table
  does) and cache-cold (round-robin over enough copies of the block that their weights and
  inputs exceed the last-level cache).

Writes ``blocks.csv`` (one row per block) and ``summary.json`` into ``--out-dir`` and prints the
per-plan sums and the blocks that deviate most.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnose_prediction.py \
    [--model torchvision:mobilenet_v2] [--table latency_tables/cpu_onnxruntime/mobilenet_v2.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from dpcompress.backends import export_onnx_bytes, get_backend
from dpcompress.graph.geometry import block_geometry
from dpcompress.models import build_model
from dpcompress.latency.profile import block_input_shape, block_module
from dpcompress.graph.rewrite import merged_model
from dpcompress.search.solver import resolve_budget, solve_for_model
from dpcompress.tables import meta_path_for, read_latency_table
from dpcompress.latency.timing import time_runner
from dpcompress.graph.trace import trace_model

CONV_OPS = {"Conv", "FusedConv"}
LAST_LEVEL_CACHE_BYTES = 32 << 20  # the dev machine's L3; --llc-mib to change


def node_times(session, feed, runs: int) -> List[Tuple[str, str, float]]:
    """(node name, op, median kernel time in ms) in execution order, from ORT's profiler."""
    for _ in range(runs):
        session.run(None, feed)
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    os.unlink(path)
    by_node: Dict[str, List[float]] = defaultdict(list)
    order: List[Tuple[str, str]] = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        if name not in by_node:
            order.append((name, e["args"]["op_name"]))
        by_node[name].append(e["dur"] / 1e3)
    # The first runs are warm-up (allocation, first-touch): keep the last half.
    return [(name, op, statistics.median(by_node[name][len(by_node[name]) // 2:])) for name, op in order]


def profiled_session(backend, module: torch.nn.Module, input_shape: Sequence[int]):
    import onnxruntime as ort

    example = torch.randn(*input_shape)
    options = backend.session_options()
    options.enable_profiling = True
    options.profile_file_prefix = "/tmp/dpc_diag"
    session = ort.InferenceSession(export_onnx_bytes(module.eval(), example), options,
                                   providers=["CPUExecutionProvider"])
    return session, {"x": example.numpy()}


def round_robin_ms(runners, warmup: int, iters: int) -> float:
    """Median latency of one run when runs cycle through the copies (each finds the others' data in cache)."""
    for runner in runners:
        runner.time(warmup, 0)
    return statistics.median(runners[i % len(runners)].time(0, 1)[0] for i in range(iters * len(runners)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--table", default="latency_tables/cpu_onnxruntime/mobilenet_v2.csv")
    parser.add_argument("--input-shape", default="1,3,224,224")
    parser.add_argument("--ratios", default="0.9,0.7,0.5")
    parser.add_argument("--threads", type=int, default=None, help="ORT threads [default: the table's]")
    parser.add_argument("--runs", type=int, default=60, help="profiled runs per network or block")
    parser.add_argument("--llc-mib", type=float, default=LAST_LEVEL_CACHE_BYTES / 2**20)
    parser.add_argument("--out-dir", default="out/diagnose_prediction")
    args = parser.parse_args()

    torch.manual_seed(0)
    shape = tuple(int(x) for x in args.input_shape.split(","))
    table = read_latency_table(args.table)
    meta_path = meta_path_for(args.table)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    threads = args.threads or meta.get("threads")
    backend = get_backend("onnxruntime", threads=threads)
    model = build_model(args.model, None).eval()
    traced = trace_model(model, shape, spec=args.model)
    chain = traced.chain
    overheads = meta.get("call_overhead_ms", {})

    networks = {"original": (model, [(p - 1, p) for p in range(1, chain.num_positions + 1)], table.original_latency_ms())}
    for ratio in (float(r) for r in args.ratios.split(",")):
        plan, _ = solve_for_model(table, None, resolve_budget(table, None, ratio), chain=chain)
        networks[f"plan@{ratio:g}"] = (merged_model(traced, plan), list(plan.blocks), plan.latency_ms)

    in_network: Dict[Tuple[int, int], List[float]] = defaultdict(list)
    summary = {"model": args.model, "table": args.table, "threads": threads, "networks": {}}
    with torch.no_grad():
        for name, (net, blocks, predicted) in networks.items():
            session, feed = profiled_session(backend, net, shape)
            nodes = node_times(session, feed, args.runs)
            convs = [(n, t) for n, op, t in nodes if op in CONV_OPS]
            if len(convs) != len(blocks):
                raise SystemExit(f"{name}: {len(convs)} conv nodes for {len(blocks)} blocks; "
                                 "this script maps them in order and needs a model whose only convs are trunk convs")
            for block, (_, t) in zip(blocks, convs):
                in_network[block].append(t)
            other = defaultdict(float)
            for _, op, t in nodes:
                if op not in CONV_OPS:
                    other[op] += t
            summary["networks"][name] = {
                "blocks": len(blocks), "table_sum_ms": predicted,
                "conv_nodes_ms": sum(t for _, t in convs), "other_nodes_ms": dict(other),
                "wall_ms": time_runner(backend.prepare(net, shape), 10, args.runs).median_ms,
            }
            print(f"{name}: {len(blocks)} blocks, table {predicted:.3f} ms, in-network convs "
                  f"{summary['networks'][name]['conv_nodes_ms']:.3f} ms, other nodes {sum(other.values()):.3f} ms "
                  f"({', '.join(f'{k} {v:.3f}' for k, v in sorted(other.items()))}), wall "
                  f"{summary['networks'][name]['wall_ms']:.3f} ms", flush=True)

        rows = []
        for block in sorted(in_network):
            g = block_geometry(chain, *block)
            shape_in = block_input_shape(g, shape[0])
            module = block_module(g)
            session, feed = profiled_session(backend, module, shape_in)
            nodes = node_times(session, feed, args.runs)
            alone_conv = sum(t for _, op, t in nodes if op in CONV_OPS)
            alone_other = sum(t for _, op, t in nodes if op not in CONV_OPS)
            hot_ms = time_runner(backend.prepare(module, shape_in), 10, args.runs).median_ms
            weight_bytes = sum(p.numel() * 4 for p in module.parameters())
            io_bytes = 4 * (np.prod(shape_in) + np.prod(g.out_shape) // g.out_shape[0] * shape[0])
            copies = int(min(64, max(2, np.ceil(2 * args.llc_mib * 2**20 / (weight_bytes + io_bytes)))))
            cold = [backend.prepare(block_module(g), shape_in) for _ in range(copies)]
            cold_ms = round_robin_ms(cold, 2, max(10, args.runs // copies))
            overhead = overheads.get("x".join(map(str, shape_in)), 0.0)
            row = {
                "start": block[0], "end": block[1], "kernel": g.kernel[0], "stride": g.stride[0],
                "groups": g.groups, "in_channels": g.in_channels, "out_channels": g.out_channels,
                "in_hw": g.in_shape[2], "weight_kib": weight_bytes / 1024,
                "table_ms": table.latency_ms[block], "in_network_ms": statistics.median(in_network[block]),
                "alone_conv_node_ms": alone_conv, "alone_other_nodes_ms": alone_other,
                "alone_hot_wall_ms": hot_ms, "alone_cold_wall_ms": cold_ms, "cold_copies": copies,
                "call_overhead_ms": overhead,
            }
            rows.append(row)
            print(f"({block[0]},{block[1]}) k{g.kernel[0]} g{g.groups} {g.in_channels}->{g.out_channels} "
                  f"@{g.in_shape[2]}: table {row['table_ms']:.4f}, in-network {row['in_network_ms']:.4f}, "
                  f"alone conv {alone_conv:.4f} + edges {alone_other:.4f}, hot {hot_ms:.4f}, "
                  f"cold {cold_ms:.4f} (x{copies})", flush=True)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "blocks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by_block = {(r["start"], r["end"]): r for r in rows}
    for name, (_, blocks, _) in networks.items():
        figures = summary["networks"][name]
        for column in ("table_ms", "in_network_ms", "alone_conv_node_ms", "alone_other_nodes_ms",
                       "alone_hot_wall_ms", "alone_cold_wall_ms", "call_overhead_ms"):
            figures["sum_" + column] = sum(by_block[b][column] for b in blocks)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
