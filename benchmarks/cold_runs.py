"""How much a network's first run after another network (cold) shifts its blocks' shares (OpenVINO, issue 15).

OpenVINO's counters are running averages since compiling (``benchmarks/openvino_counters.py``), so
in-network timing cannot leave out each round's warm-up run. On fresh compiles the run count is
small and the readings exact to a few microseconds: each trial compiles the network of single convs
and a packed network of a deep plan's merged blocks, warms it 5 runs, runs the original 10 times,
then one cold run and 10 warm ones, reading the counters between. Prints per block its warm and cold
time and its share of the network warm and with one cold run in eleven (as a profile round has).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cold_runs.py --trials 25
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mobilenet_setup import SHAPE, mobilenet_v2  # benchmarks/ is the script's folder, so on sys.path
from dpcompress.backends import export_onnx_bytes, get_backend
from dpcompress.backends.onnxruntime_backend import graph_part_owners
from dpcompress.backends.openvino_backend import running_part_us
from dpcompress.graph.geometry import block_geometry
from dpcompress.latency.network_timing import packed_network, packed_plan

# mobilenet_v2's plan at budget 0.54 on the OpenVINO tables of 2026-12-06 (its merged blocks)
DEEP_BLOCKS = [(0, 12), (12, 15), (15, 21), (21, 24), (24, 27), (27, 30), (30, 42), (42, 45), (45, 48), (48, 51)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, traced = mobilenet_v2()
    shape = SHAPE
    backend = get_backend("openvino", threads=args.threads)
    x = torch.randn(*shape)
    original = backend._request(backend._core.read_model(export_onnx_bytes(model, x)), x)
    for label, members in (("single convs", []), ("deep plan's blocks", DEEP_BLOCKS)):
        plan = packed_plan(traced.chain, members)
        network, names = packed_network(traced, plan, {(*b, ()): block_geometry(traced.chain, *b) for b in plan.blocks})
        exported = export_onnx_bytes(network.eval(), x)
        owners = graph_part_owners(exported, list(names))
        ov_model = backend._core.read_model(exported)
        cold: dict = {}
        warm: dict = {}
        for _ in range(args.trials):
            request = backend._request(ov_model, x, profiling=True)

            def parts_us(runs: int) -> dict:
                return running_part_us(request.get_profiling_info(), runs, owners, {})[0]

            for _ in range(5):
                request.infer()
            before = parts_us(5)
            for _ in range(10):
                original.infer()
            request.infer()
            after_cold = parts_us(6)
            for _ in range(10):
                request.infer()
            after_warm = parts_us(16)
            for part in before:
                cold.setdefault(part, []).append(after_cold[part] - before[part])
                warm.setdefault(part, []).append((after_warm[part] - after_cold[part]) / 10)
        cold_total = sum(statistics.mean(v) for v in cold.values())
        warm_total = sum(statistics.mean(v) for v in warm.values())
        print(f"## {label}: all blocks warm {warm_total:.0f} us, cold {cold_total:.0f} us "
              f"({cold_total / warm_total:.3f}x)")
        print("| block | warm us | cold us | cold / warm | share warm | share, one cold run in 11 |")
        print("|---|---|---|---|---|---|")
        for part in sorted(cold, key=lambda p: names[p]):
            c, w = statistics.mean(cold[part]), statistics.mean(warm[part])
            mixed = (10 * w + c) / (10 * warm_total + cold_total)
            print(f"| {names[part][:2]} | {w:.1f} | {c:.1f} | {c / w:.2f} | {w / warm_total:.4f} | {mixed:.4f} |")


if __name__ == "__main__":
    main()
