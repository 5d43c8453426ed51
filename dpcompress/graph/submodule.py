"""Compressing one submodule of a larger model in place: the input it receives, and putting it back.

A detector's or segmenter's backbone is where depth compression pays, but the whole model
cannot be traced as one chain (it takes lists of images, post-processes boxes). The
submodule is traced, profiled, solved and merged on its own, at the input shape it receives
inside the model, found by running the model once. Tensors it returns in several places
(feature taps for a feature pyramid) are read by its output, so the tracer makes each a
boundary that no block crosses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from dpcompress.errors import UserError
from dpcompress.graph.trace import TracedModel, trace_model


@dataclass(frozen=True)
class SubmoduleSite:
    name: str
    module: nn.Module  # what is compressed: the submodule, or its children chained (ChainedChildren)
    input_shape: Tuple[int, ...]  # the shape of the one tensor it receives inside the model
    chained_children: bool  # the submodule is a container whose children the model calls one after another


class ChainedChildren(nn.Module):
    """A container's children run one after another, returning every child's output (each one a tap)."""

    def __init__(self, children: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(children)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return tuple(outputs)


def run_model(model: nn.Module, sample: torch.Tensor) -> Any:
    """``model`` on ``sample``; detection models that take a list of images get one (one per batch item)."""
    with torch.no_grad():
        try:
            return model(sample)
        except Exception as tensor_error:  # models differ in how they fail on the wrong input type
            try:
                return model(list(sample))
            except Exception:
                raise UserError(f"the model does not run on input shape {tuple(sample.shape)} "
                                f"({type(tensor_error).__name__}: {str(tensor_error).splitlines()[0]})") \
                    from tensor_error


def _children_hint(model: nn.Module, name: str) -> str:
    parent_name = name.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent, parent_name = model, ""
    names = [f"{parent_name}.{child}" if parent_name else child for child, _ in parent.named_children()]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def submodule_site(model: nn.Module, name: str, input_shape: Sequence[int]) -> SubmoduleSite:
    """Where submodule ``name`` sits in ``model`` and the input shape it receives when ``model`` runs on
    ``input_shape`` (eval mode, random input).

    A container that the model never calls but whose children it calls one after another, each on the
    one before's output (SSDLite's ``backbone.features``), is compressed as those children chained, with
    every child's output a tap.
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UserError(f"the model has no submodule {name!r}; its names at that level: "
                        f"{_children_hint(model, name)}") from None
    children = list(module.children()) if isinstance(module, (nn.Sequential, nn.ModuleList)) else []
    calls = _record_calls(model, [module, *children], input_shape)
    if calls[0]:
        return SubmoduleSite(name, module, _one_input_shape(name, calls[0]), chained_children=False)
    if children and _called_in_a_chain(calls[1:]):
        return SubmoduleSite(name, ChainedChildren(children), _one_input_shape(name, calls[1]),
                             chained_children=True)
    raise UserError(f"submodule {name!r} is not called when the model runs on input {tuple(input_shape)}"
                    + (" (nor are its children, one after another)" if children else ""))


Call = Tuple[tuple, dict, Any]  # positional inputs, keyword inputs, output


def _record_calls(model: nn.Module, modules: Sequence[nn.Module], input_shape: Sequence[int]) -> List[List[Call]]:
    """Every call of each of ``modules`` while ``model`` runs once."""
    calls: List[List[Call]] = [[] for _ in modules]
    handles = []
    for index, module in enumerate(modules):
        def record(_module: nn.Module, args: tuple, kwargs: dict, output: Any, index: int = index) -> None:
            calls[index].append((args, kwargs, output))

        handles.append(module.register_forward_hook(record, with_kwargs=True))
    try:
        run_model(model.eval(), torch.randn(*input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _one_input_shape(name: str, calls: List[Call]) -> Tuple[int, ...]:
    if len(calls) > 1:
        raise UserError(f"submodule {name!r} is called {len(calls)} times per forward; compress a submodule "
                        "that runs once (its weights would be merged for one call site only)")
    args, kwargs, _ = calls[0]
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        raise UserError(f"submodule {name!r} receives {_describe_inputs(args, kwargs)}; dpcompress compresses "
                        "a submodule that takes one N,C,H,W tensor")
    return tuple(int(s) for s in args[0].shape)


def _called_in_a_chain(calls: List[List[Call]]) -> bool:
    """Each child called once, on one tensor, the first child's input aside being the one before's output."""
    if any(len(c) != 1 for c in calls):
        return False
    for before, after in zip(calls, calls[1:]):
        args, kwargs, _ = after[0]
        if len(args) != 1 or kwargs or args[0] is not before[0][2]:
            return False
    return all(isinstance(c[0][2], torch.Tensor) for c in calls)


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    parts = [f"a tensor of shape {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
             for a in args] + [f"{k}=" for k in kwargs]
    return f"{len(parts)} inputs ({', '.join(parts)})" if len(parts) != 1 else parts[0]


def trace_target(model: nn.Module, input_shape: Sequence[int], submodule: Optional[str] = None,
                 spec: Optional[str] = None, capture: str = "auto") -> Tuple[TracedModel, Optional[SubmoduleSite]]:
    """``model`` traced at ``input_shape``, or with ``submodule`` that part traced at the input it receives
    inside the model; and the submodule's site (None without one). ``capture`` as trace_model takes it."""
    if submodule is None:
        return trace_model(model, input_shape, spec=spec, capture=capture), None
    site = submodule_site(model, submodule, input_shape)
    return trace_model(site.module, site.input_shape, spec=spec, capture=capture), site


def put_back(model: nn.Module, site: SubmoduleSite, compressed: fx.GraphModule) -> nn.Module:
    """A copy of ``model`` with the submodule replaced by ``compressed`` (for chained children, by a container
    of the same type holding one slice of ``compressed`` per child: child k maps tap k-1 to tap k)."""
    return with_submodule(model, site.name, _replacement(model, site, compressed))


def _replacement(model: nn.Module, site: SubmoduleSite, compressed: fx.GraphModule) -> nn.Module:
    if not site.chained_children:
        return compressed
    output = next(n for n in compressed.graph.nodes if n.op == "output")
    taps = list(output.args[0])
    inputs = [next(n for n in compressed.graph.nodes if n.op == "placeholder"), *taps[:-1]]
    slices = [_graph_slice(compressed, start, end, index) for index, (start, end) in enumerate(zip(inputs, taps))]
    if isinstance(model.get_submodule(site.name), nn.Sequential):
        return nn.Sequential(*slices)
    return nn.ModuleList(slices)


def _graph_slice(gm: fx.GraphModule, start: fx.Node, end: fx.Node, index: int) -> fx.GraphModule:
    """The part of ``gm`` that computes ``end`` from ``start``."""
    needed = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if node in needed or node is start:
            continue
        if node.op == "placeholder":
            raise UserError(f"child {index} of the chained submodule reads more than the child before it")
        needed.add(node)
        stack.extend(node.all_input_nodes)
    graph = fx.Graph()
    env = {start: graph.placeholder("x")}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[end])
    return fx.GraphModule(gm, graph, class_name=f"DpcompressSlice{index}")


def with_submodule(model: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
    """A copy of ``model`` with submodule ``name`` replaced by ``replacement`` (``model`` is left as it was)."""
    original = model.get_submodule(name)
    # The memo puts ``replacement`` (uncopied) wherever the copy would have held the original submodule.
    return copy.deepcopy(model, memo={id(original): replacement}).eval()
