"""Trace a model with torch.fx into a Chain, keeping the fx nodes of each conv unit.

The graph is built once; everything after queries plain objects. A conv joins the
trunk when it lies on the main data path (not in the gate branch of a gated
multiply such as squeeze-excitation). Each trunk conv is followed along
single-user edges through its BatchNorm, eval-time identities (dropout,
stochastic depth), an identity residual add, its activation and the eval-time
identities after it (timm's ``aa`` and ``se`` slots when unused). Anything else
between two trunk convs is a barrier, described in the chain's notes.

Reads of a tensor's metadata (``x.ndim``, ``x.shape``, ``x.size()``, ``x.dim()``,
``x.dtype``, ``x.device``) whose results feed only assertions on them read no values:
they are no user of the tensor here, and the rewrite drops those whose tensor a block
merges away.
"""

from __future__ import annotations

import contextlib
import copy
import io

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from dpcompress.graph.chain import Chain, ConvUnit, Residual
from dpcompress.errors import UserError

ACTIVATION_MODULES: Tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.PReLU, nn.SELU, nn.CELU, nn.Tanh, nn.Hardtanh, nn.Softplus,
)
ACTIVATION_FUNCTIONS = {
    F.relu: "ReLU", torch.relu: "ReLU", F.relu6: "ReLU6", F.silu: "SiLU", F.hardswish: "Hardswish",
    F.gelu: "GELU", F.leaky_relu: "LeakyReLU", F.elu: "ELU", F.mish: "Mish", torch.tanh: "Tanh",
    F.hardtanh: "Hardtanh", F.selu: "SELU", F.celu: "CELU", F.softplus: "Softplus", F.prelu: "PReLU",
}
ACTIVATION_METHODS = {"relu": "ReLU", "relu_": "ReLU", "tanh": "Tanh"}
ADD_TARGETS = {operator.add, operator.iadd, torch.add}
MUL_TARGETS = {operator.mul, operator.imul, torch.mul}
# Modules and functions that are the identity at inference time.
IDENTITY_MODULES: Tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
IDENTITY_FUNCTION_NAMES = {"stochastic_depth", "dropout"}
CAPTURES = ("auto", "fx", "export")  # how trace_model takes a model's graph
METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
METADATA_METHODS = {"size", "dim"}


@dataclass
class UnitNodes:
    """The fx nodes of one conv unit, in execution order."""

    conv: fx.Node
    batchnorm: Optional[fx.Node]
    identities: List[fx.Node]  # eval-time identities after the BatchNorm (dropped when merged)
    pre_add: fx.Node  # last node before the residual add: conv, BatchNorm or identity
    residual_add: Optional[fx.Node]  # identity residual closing at this position
    activation: Optional[fx.Node]
    trailing: List[fx.Node]  # eval-time identities after the activation (or the add, or pre_add)
    output: fx.Node  # the position's tensor

    @property
    def input(self) -> fx.Node:
        return self.conv.args[0]  # type: ignore[return-value]


@dataclass
class TracedModel:
    """A model, its fx graph (with shapes) and its Chain, with the nodes behind each position."""

    model: nn.Module
    gm: fx.GraphModule
    chain: Chain
    units: List[UnitNodes]
    residual_adds: Dict[Tuple[int, int], fx.Node] = field(default_factory=dict)
    metadata_checks: Set[fx.Node] = field(default_factory=set)  # see metadata_checks()

    def unit_nodes(self, position: int) -> UnitNodes:
        return self.units[position - 1]


def parse_input_shape(text: str) -> Tuple[int, int, int, int]:
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise UserError(f"--input-shape {text!r} must be four positive integers N,C,H,W, e.g. 1,3,224,224")
    return dims  # type: ignore[return-value]


def chain_for_spec(spec: str, input_shape: Sequence[int], weights: Optional[str] = None) -> Chain:
    """Build the model a spec names and return its Chain."""
    from dpcompress.models import build_model

    return trace_model(build_model(spec, weights), input_shape, spec=spec).chain


def _is_norm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d and kin: a BatchNorm2d subclass that applies dropout and an activation inside."""
    return (isinstance(module, nn.BatchNorm2d) and type(module) is not nn.BatchNorm2d
            and isinstance(getattr(module, "act", None), nn.Module) and isinstance(getattr(module, "drop", None), nn.Module))


def unfused_norm_acts(model: nn.Module) -> nn.Module:
    """``model``, or where it holds norm-act modules a copy with each one a BatchNorm2d, its dropout and its
    activation in sequence (the same function in eval mode), so the tracer sees the activation."""
    if not any(_is_norm_act(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if not _is_norm_act(module):
            continue
        plain = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        plain.load_state_dict(module.state_dict(), strict=False)  # the norm's own tensors; act and drop have none
        plain.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                nn.Sequential(plain, module.drop, module.act))
    return model


def trace_model(model: nn.Module, input_shape: Sequence[int], spec: Optional[str] = None,
                capture: str = "auto") -> TracedModel:
    """Trace ``model`` (in eval mode) at ``input_shape`` into a TracedModel (of a copy with norm-act modules
    unfused, where it has any). ``capture`` (CAPTURES) says how its graph is taken: ``fx``
    (``torch.fx.symbolic_trace``), ``export`` (``torch.export``, export_capture.py) or ``auto``, fx and where
    fx cannot trace the model, export. The model of a TracedModel captured by export is its GraphModule: it
    computes what the model does, in the ops its rewritten networks are made of."""
    model = unfused_norm_acts(model.eval())
    sample = torch.randn(*input_shape, dtype=next(model.parameters()).dtype)
    gm, how, notes = capture_graph(model, sample, capture)
    if how == "export":
        model = gm
    try:
        # ShapeProp prints the traceback of a failing op itself; the one line below says it.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(sample)
    except Exception as err:
        cause = err.__cause__ or err  # ShapeProp wraps the op's own error in a description of the node
        raise UserError(f"the model does not run on input shape {tuple(input_shape)}: "
                        f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}") from err
    traced = _Tracer(model, gm, tuple(input_shape), spec).run()
    traced.chain.capture = how
    traced.chain.notes[:0] = notes
    return traced


def require_logits(traced: TracedModel, purpose: str) -> None:
    """UserError unless the traced model returns one tensor, the logits that ``purpose`` (fine-tuning,
    measured importance) trains or compares."""
    output = next(n for n in traced.gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(output, fx.Node):
        kind = next((t.__name__ for t in (dict, tuple, list) if isinstance(output, t)), type(output).__name__)
        raise UserError(f"{purpose} needs a model whose forward returns one tensor of logits; this one returns a "
                        f"{kind} (a detector?): use uniform importance or an importance table, "
                        "and fine-tune the reference network in your own training loop")


def capture_graph(model: nn.Module, sample: torch.Tensor, capture: str) -> Tuple[fx.GraphModule, str, List[str]]:
    """The model's graph, how it was captured (``fx`` or ``export``) and a note on why, where fx was tried and
    failed. A model no allowed capture takes is a UserError naming each one's failure."""
    if capture not in CAPTURES:
        raise UserError(f"unknown capture {capture!r}; choose one of {', '.join(CAPTURES)}")
    fx_failure = None
    if capture in ("auto", "fx"):
        try:
            return fx.symbolic_trace(model), "fx", []
        except Exception as err:  # fx raises many types for untraceable Python
            fx_failure = f"torch.fx cannot trace the model ({_one_line(err)})"
            if capture == "fx":
                raise UserError(f"{fx_failure}; try capture 'export' (torch.export)") from err
    from dpcompress.graph.export_capture import export_graph_module

    try:
        gm = export_graph_module(model, sample)
    except Exception as err:  # torch.export raises many types for what it cannot capture
        export_failure = f"torch.export cannot capture the model ({_one_line(err)})"
        if fx_failure is None:
            raise UserError(export_failure) from err
        raise UserError(f"neither capture takes the model: {fx_failure}; {export_failure}") from err
    return gm, "export", [f"captured with torch.export: {fx_failure}"] if fx_failure else []


def _one_line(err: BaseException) -> str:
    """The error's type and the first non-empty line of its message (at most 200 characters)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def _shape(node: fx.Node) -> Optional[Tuple[int, ...]]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _numel(node: fx.Node) -> int:
    shape = _shape(node)
    n = 1
    for d in shape or ():
        n *= d
    return n


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in METADATA_ATTRIBUTES
    return node.op == "call_method" and node.target in METADATA_METHODS


def metadata_checks(graph: fx.Graph) -> Set[fx.Node]:
    """The nodes that read tensors' metadata, compute from it and end in assertions (or in nothing), such as
    ``torch._assert(x.ndim == 4)`` or ``n, c, h, w = x.shape``, with the parameters read only by them
    (``x.dtype == self.weight.dtype``). A metadata value that feeds real computation (a reshape to
    ``x.shape``) is left out: the tensor it reads must then exist."""
    derived: Set[fx.Node] = set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if _reads_metadata(node) or (node.op in ("call_function", "call_method") and inputs
                                     and all(a in derived for a in inputs)):
            derived.add(node)
    checks: Set[fx.Node] = set()
    for node in reversed(graph.nodes):
        feeds_only_checks = all(user in checks for user in node.users)
        if (node in derived and feeds_only_checks) or (node.op == "get_attr" and node.users and feeds_only_checks):
            checks.add(node)
    return checks


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human name for what a node does."""
    module = _module(gm, node)
    if module is not None:
        return f"{type(module).__name__} ({node.target})"
    if node.op == "call_function":
        target = getattr(node.target, "overloadpacket", node.target)  # an ATen op (export capture): "cat"
        return getattr(target, "__name__", str(target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


class _Tracer:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, input_shape: Tuple[int, ...], spec: Optional[str]):
        self.model, self.gm, self.input_shape, self.spec = model, gm, input_shape, spec
        self.notes: List[str] = []
        self.checks = metadata_checks(gm.graph)

    def readers(self, node: fx.Node) -> List[fx.Node]:
        """The users of ``node`` that read its values (not only its metadata)."""
        return [user for user in node.users if user not in self.checks]

    def only_reader(self, node: fx.Node) -> Optional[fx.Node]:
        readers = self.readers(node)
        return readers[0] if len(readers) == 1 else None

    def identities_after(self, node: fx.Node) -> List[fx.Node]:
        """The eval-time identities applied one after another to ``node``, each its only reader."""
        identities: List[fx.Node] = []
        nxt = self.only_reader(node)
        while nxt is not None and self.is_eval_identity(nxt) and nxt.args and nxt.args[0] is node:
            identities.append(nxt)
            node = nxt
            nxt = self.only_reader(node)
        return identities

    # --- classification of nodes ---
    def activation_kind(self, node: fx.Node) -> Optional[str]:
        module = _module(self.gm, node)
        if module is not None:
            return type(module).__name__ if isinstance(module, ACTIVATION_MODULES) else None
        if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
            return ACTIVATION_FUNCTIONS[node.target]  # type: ignore[index]
        if node.op == "call_method" and node.target in ACTIVATION_METHODS:
            return ACTIVATION_METHODS[node.target]  # type: ignore[index]
        return None

    def is_eval_identity(self, node: fx.Node) -> bool:
        module = _module(self.gm, node)
        if module is not None:
            return isinstance(module, IDENTITY_MODULES)
        return node.op == "call_function" and getattr(node.target, "__name__", "") in IDENTITY_FUNCTION_NAMES

    def is_add(self, node: fx.Node) -> bool:
        if node.op == "call_function" and node.target in ADD_TARGETS:
            return len(node.args) == 2 and not node.kwargs
        return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs

    def is_mul(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target in MUL_TARGETS
        return node.op == "call_method" and node.target in ("mul", "mul_")

    # --- the trunk ---
    def trunk_nodes(self) -> Set[fx.Node]:
        """Nodes on the main data path: everything the output depends on, except gate branches."""
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        trunk: Set[fx.Node] = set()
        stack = [output]
        while stack:
            node = stack.pop()
            if node in trunk:
                continue
            trunk.add(node)
            inputs = [a for a in node.all_input_nodes]
            if self.is_mul(node):
                # A broadcast operand of a multiply is a gate (squeeze-excitation), not the trunk.
                inputs = [a for a in inputs if _numel(a) >= _numel(node)]
            stack.extend(inputs)
        return trunk

    def trunk_convs(self, trunk: Set[fx.Node]) -> List[fx.Node]:
        calls: Dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        convs = []
        for node in self.gm.graph.nodes:
            module = _module(self.gm, node)
            if not isinstance(module, nn.Conv2d) or isinstance(module, nn.ConvTranspose2d):
                continue
            if node not in trunk:
                continue
            reason = None
            if calls[node.target] > 1:
                reason = "is called more than once (shared weights)"
            elif module.padding_mode != "zeros":
                reason = f"uses padding_mode={module.padding_mode!r}"
            elif _conv_padding(module) is None:
                reason = "uses 'same' padding with an even kernel"
            elif len(node.args) != 1 or node.kwargs:
                reason = "is called with extra arguments"
            if reason:
                self.notes.append(f"conv {node.target} {reason}: kept as an opaque op (barrier)")
            else:
                convs.append(node)
        return convs

    # --- conv units ---
    def follow_unit(self, conv: fx.Node, unit_inputs: Dict[fx.Node, int]) -> Tuple[UnitNodes, Optional[int]]:
        """Walk from a trunk conv along single-user edges; return its nodes and the residual start, if any."""
        current = conv
        batchnorm = None
        nxt = self.only_reader(current)
        if nxt is not None and isinstance(_module(self.gm, nxt), nn.BatchNorm2d):
            batchnorm = current = nxt
        identities = self.identities_after(current)
        pre_add = current = identities[-1] if identities else current
        residual_add, residual_start = None, None
        nxt = self.only_reader(current)
        if nxt is not None and self.is_add(nxt):
            other = nxt.args[1] if nxt.args[0] is current else nxt.args[0]
            start = unit_inputs.get(other) if isinstance(other, fx.Node) else None
            if start is not None and _shape(other) == _shape(current):
                residual_add, residual_start, current = nxt, start, nxt
        activation = None
        nxt = self.only_reader(current)
        if nxt is not None and self.activation_kind(nxt) is not None and nxt.args and nxt.args[0] is current:
            activation = current = nxt
        trailing = self.identities_after(current)
        nodes = UnitNodes(conv=conv, batchnorm=batchnorm, identities=identities, pre_add=pre_add,
                          residual_add=residual_add, activation=activation, trailing=trailing,
                          output=trailing[-1] if trailing else current)
        return nodes, residual_start

    def barrier_reason(self, prev: UnitNodes, unit: UnitNodes, residual_starts: Dict[fx.Node, int],
                       position_of: Dict[fx.Node, int]) -> Optional[str]:
        """Why conv ``unit`` cannot merge with the unit before it (None when it can)."""
        if unit.input is not prev.output:
            node = unit.input
            # Walk back to the first op that is not an activation/identity, for a useful message.
            while node not in position_of and (self.activation_kind(node) or self.is_eval_identity(node)) \
                    and node.all_input_nodes:
                node = node.all_input_nodes[0]
            if node in position_of:
                return f"a branch: this conv reads position {position_of[node]}"
            op = describe(self.gm, node)
            if self.is_add(node):
                op = "residual add whose shortcut is not an identity"
            elif self.is_mul(node):
                op = "gated multiply (squeeze-excitation)"
            return op
        extra = [u for u in self.readers(prev.output) if u is not unit.conv and residual_starts.get(u) is None]
        if extra:
            return f"position also read by {describe(self.gm, extra[0])}"
        return None

    def run(self) -> TracedModel:
        trunk = self.trunk_nodes()
        convs = self.trunk_convs(trunk)
        if not convs:
            raise UserError("the model has no Conv2d on its main path: nothing to compress")
        unit_inputs: Dict[fx.Node, int] = {}  # conv input node -> position before that conv
        units: List[UnitNodes] = []
        residuals: List[Residual] = []
        residual_adds: Dict[Tuple[int, int], fx.Node] = {}
        add_start: Dict[fx.Node, int] = {}
        for position, conv in enumerate(convs, start=1):
            unit_inputs.setdefault(conv.args[0], position - 1)  # type: ignore[arg-type]
            nodes, start = self.follow_unit(conv, unit_inputs)
            if start is not None and self._stride_one(convs[start:position]):
                residuals.append(Residual(start, position))
                residual_adds[(start, position)] = nodes.residual_add  # type: ignore[assignment]
                add_start[nodes.residual_add] = start  # type: ignore[index]
            elif start is not None:
                # Same shapes through a strided run is a coincidence we do not merge through.
                nodes = UnitNodes(conv=nodes.conv, batchnorm=nodes.batchnorm, identities=nodes.identities,
                                  pre_add=nodes.pre_add, residual_add=None, activation=None, trailing=[],
                                  output=nodes.pre_add)
            units.append(nodes)
        position_of = {nodes.output: p for p, nodes in enumerate(units, start=1)}
        conv_units = []
        for position, nodes in enumerate(units, start=1):
            barrier = None
            if position == 1:
                linked = False
            else:
                barrier = self.barrier_reason(units[position - 2], nodes, add_start, position_of)
                linked = barrier is None
                if barrier:
                    self.notes.append(f"barrier at position {position - 1}: {barrier}")
            conv_units.append(self._conv_unit(position, nodes, linked, barrier))
        chain = Chain(model=self.spec, input_shape=self.input_shape, units=conv_units,
                      residuals=residuals, notes=self.notes)
        return TracedModel(model=self.model, gm=self.gm, chain=chain, units=units, residual_adds=residual_adds,
                           metadata_checks=self.checks)

    def _stride_one(self, convs: Sequence[fx.Node]) -> bool:
        return all(tuple(self.gm.get_submodule(c.target).stride) == (1, 1) for c in convs)  # type: ignore[arg-type]

    def _conv_unit(self, position: int, nodes: UnitNodes, linked: bool, barrier: Optional[str]) -> ConvUnit:
        conv = self.gm.get_submodule(nodes.conv.target)  # type: ignore[arg-type]
        assert isinstance(conv, nn.Conv2d)
        padding = _conv_padding(conv)
        assert padding is not None
        return ConvUnit(
            position=position, name=str(nodes.conv.target),
            in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel=_pair(conv.kernel_size), stride=_pair(conv.stride), padding=padding,
            dilation=_pair(conv.dilation), groups=conv.groups, bias=conv.bias is not None,
            in_shape=_shape(nodes.input),  # type: ignore[arg-type]
            out_shape=_shape(nodes.conv),  # type: ignore[arg-type]
            batchnorm=str(nodes.batchnorm.target) if nodes.batchnorm is not None else None,
            activation=self.activation_kind(nodes.activation) if nodes.activation is not None else None,
            linked=linked, barrier=barrier,
        )


def _pair(value: Sequence[int]) -> Tuple[int, int]:
    return int(value[0]), int(value[1])


def _conv_padding(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """Symmetric padding per axis, resolving 'valid'/'same'; None where 'same' would be asymmetric."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            extent = d * (k - 1)
            if extent % 2:
                return None
            pads.append(extent // 2)
        return pads[0], pads[1]
    return _pair(conv.padding)  # type: ignore[arg-type]
