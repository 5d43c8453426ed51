"""Does OpenVINO run two blocks' convolutions in one node on this machine? (issue 15)

Builds the networks the in-network profiler builds for ``--model`` (the network of single convs, then
up to ``--networks`` packings of the multi-conv blocks), compiles each in OpenVINO with profiling on,
and prints how many parts it has, the nodes that run convs of several parts with each part's share
of their time (``openvino_backend.shared_node_shares``), and the parts that got no time at all.

    .venv/bin/python benchmarks/openvino_shared_nodes.py --model torchvision:resnet18 --size 64
"""

from __future__ import annotations

import argparse

import torch

from dpcompress.backends import get_backend
from dpcompress.graph.geometry import block_geometry
from dpcompress.graph.trace import trace_model
from dpcompress.latency.network_timing import pack, packed_network, packed_plan
from dpcompress.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--networks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (1, 3, args.size, args.size)
    traced = trace_model(build_model(args.model).eval(), shape, spec=args.model)
    chain = traced.chain
    packings, _ = pack([b for b in chain.valid_blocks() if b[1] - b[0] > 1], args.networks)
    backend = get_backend("openvino", threads=args.threads)
    for members in [[]] + packings:
        plan = packed_plan(chain, members)
        network, names = packed_network(traced, plan, {(*b, ()): block_geometry(chain, *b) for b in plan.blocks})
        _, profiled = backend.prepare_network_timing(network, shape, "fp32", list(names))
        profiled.run(3, warmup=1)
        unpriced = sorted(p for p, (ms, _) in profiled.part_times().parts.items() if ms == 0)
        print(f"{len(names)} parts; shared nodes: {profiled._shares or 'none'}; parts with no time: {unpriced or 'none'}")


if __name__ == "__main__":
    main()
