"""Capture a model with ``torch.export`` as a module-level ``fx.GraphModule`` that the tracer reads.

For models ``torch.fx.symbolic_trace`` cannot trace (Ultralytics YOLO iterates over a proxy and
branches on shapes). ``torch.export`` runs the model's Python on fake tensors instead (non-strict:
TorchDynamo, the strict mode, refuses more Python and finds the same ATen graph when it works), at the
one input shape the chain is traced at anyway. The program is made functional
(``run_decompositions({})``: no in-place op, so no tensor changes after it is read) and turned back
into what the fx path gives the tracer:

- 2-d convolutions whose weight is a parameter or buffer: ``nn.Conv2d`` modules (call_module); linear
  layers likewise ``nn.Linear`` (so that FLOPs are counted alike);
- eval batch norms of 4-d tensors: ``nn.BatchNorm2d`` modules;
- the activations the tracer knows: the ``torch``/``F`` functions it knows;
- adds and multiplies of two operands: ``operator.add``/``operator.mul``; eval-time clones (dropout):
  nothing;
- everything else: the ATen call as it is (a barrier to the tracer, named by its op), reading the
  parameters and constants it needs as attributes.

Modules are named after their weight's place in the model (``model.2.m.0.cv1.conv``) and share its
parameter and buffer tensors. The graph returns what the model returns (tuples, lists, dicts of
tensors, from the program's output spec).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import operator
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Set

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from dpcompress.errors import UserError

aten = torch.ops.aten

# ATen activation -> a call the tracer knows, given the node's arguments by name.
ACTIVATIONS: Dict[Any, Callable[[Dict[str, Any]], Optional[tuple]]] = {
    aten.relu.default: lambda a: (torch.relu, (a["self"],), {}),
    aten.silu.default: lambda a: (F.silu, (a["self"],), {}),
    aten.hardswish.default: lambda a: (F.hardswish, (a["self"],), {}),
    aten.mish.default: lambda a: (F.mish, (a["self"],), {}),
    aten.tanh.default: lambda a: (torch.tanh, (a["self"],), {}),
    aten.selu.default: lambda a: (F.selu, (a["self"],), {}),
    aten.gelu.default: lambda a: (F.gelu, (a["self"],), {"approximate": a["approximate"]}),
    aten.leaky_relu.default: lambda a: (F.leaky_relu, (a["self"], a["negative_slope"]), {}),
    aten.celu.default: lambda a: (F.celu, (a["self"], a["alpha"]), {}),
    aten.softplus.default: lambda a: (F.softplus, (a["self"], a["beta"], a["threshold"]), {}),
    aten.prelu.default: lambda a: (F.prelu, (a["self"], a["weight"]), {}),
    aten.hardtanh.default: lambda a: ((F.relu6, (a["self"],), {}) if (a["min_val"], a["max_val"]) == (0, 6)
                                      else (F.hardtanh, (a["self"], a["min_val"], a["max_val"]), {})),
    aten.elu.default: lambda a: ((F.elu, (a["self"], a["alpha"]), {}) if (a["scale"], a["input_scale"]) == (1, 1)
                                 else None),
}
CONVOLUTIONS = {aten.conv2d.default, aten.conv2d.padding, aten.convolution.default}
BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}
BINARY = {aten.add.Tensor: operator.add, aten.mul.Tensor: operator.mul}
PASS_THROUGH = {aten.clone.default, aten.alias.default}  # the same values (the graph is functional)


def export_graph_module(model: nn.Module, sample: torch.Tensor) -> fx.GraphModule:
    """``model`` (eval mode) captured by ``torch.export`` at ``sample``'s shape as a GraphModule of
    ``nn.Conv2d``/``nn.BatchNorm2d`` modules and calls the tracer knows (see the module docstring)."""
    # Non-strict export runs the model's Python on fake tensors, and what forward stores on a module (YOLO's
    # Detect caches its anchors) would stay fake: export a copy of the modules, sharing the tensors.
    copied = copy.deepcopy(model, {id(t): t for t in [*model.parameters(), *model.buffers()]})
    with _quiet(), torch.no_grad():
        try:
            program = _export_any_batch(copied, sample)
        except Exception:  # the model fixes its batch size (or reads it): captured at the one asked
            program = torch.export.export(copied, (sample,), strict=False)
        program = program.run_decompositions({})
    return _ModuleGraph(program).build()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, prints or log records while exporting: torch.export prints the graph it has so far when it
    fails, and the caller says in one line why."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _export_any_batch(model: nn.Module, sample: torch.Tensor) -> ExportedProgram:
    """The program for any batch size, as the fx path gives (the chain and the merged convs are for one image
    size; a batch of another size is what fine-tuning and verification run). Exported at a batch of 2: at 1,
    torch.export would take the size for a constant."""
    batch = torch.export.Dim("batch", min=1)
    example = sample.new_zeros((max(2, sample.shape[0]), *sample.shape[1:]))
    return torch.export.export(model, (example,), strict=False, dynamic_shapes=({0: batch},))


class _ModuleGraph:
    """Builds the GraphModule from one exported program (functional ATen)."""

    def __init__(self, program: ExportedProgram) -> None:
        self.program = program
        self.holder = nn.Module()
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, Any] = {}  # exported node -> what stands for it in the new graph
        self.tensors: Dict[fx.Node, torch.Tensor] = {}  # exported placeholder -> the parameter or constant
        self.names: Dict[fx.Node, str] = {}  # exported placeholder -> its qualified name in the model
        self.modules: Dict[str, nn.Module] = {}  # module name -> the module it holds
        self.tuple_norms: Set[fx.Node] = set()  # batch norms made modules whose exported op returns a tuple

    def build(self) -> fx.GraphModule:
        self._inputs()
        for node in self.program.graph.nodes:
            if node.op == "call_function":
                self.env[node] = self._call(node)
        self.graph.output(self._outputs())
        self.graph.lint()
        return fx.GraphModule(self.holder, self.graph, class_name="ExportedNet").eval()  # as the model was

    # --- inputs and outputs ---
    def _inputs(self) -> None:
        state, constants = self.program.state_dict, self.program.constants
        placeholders = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        specs = self.program.graph_signature.input_specs
        user = [n for n, s in zip(placeholders, specs) if s.kind == InputKind.USER_INPUT]
        if len(user) != 1:
            raise UserError(f"torch.export captured {len(user)} inputs; dpcompress captures models that take one "
                            "N,C,H,W tensor")
        for node, spec in zip(placeholders, specs):
            if spec.kind == InputKind.USER_INPUT:
                self.env[node] = self.graph.placeholder("x")
            else:
                self.names[node] = spec.target  # type: ignore[assignment]
                self.tensors[node] = state[spec.target] if spec.target in state else constants[spec.target]

    def _outputs(self) -> Any:
        output = next(n for n in self.program.graph.nodes if n.op == "output")
        specs = self.program.graph_signature.output_specs
        flat = [self._value(arg) for arg, spec in zip(output.args[0], specs) if spec.kind == OutputKind.USER_OUTPUT]
        return pytree.tree_unflatten(flat, self.program.call_spec.out_spec)

    def _value(self, arg: Any) -> Any:
        """The new graph's counterpart of an argument of an exported node (parameters read as attributes)."""
        if isinstance(arg, fx.Node):
            if arg not in self.env:
                self.env[arg] = self.graph.get_attr(self._attach(self.names[arg], self.tensors[arg]))
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._value(a) for a in arg)
        return arg

    # --- one exported call ---
    def _call(self, node: fx.Node) -> Any:
        target = node.target
        arguments = _arguments(node)
        if target in CONVOLUTIONS and self._is_conv2d(node, arguments):
            return self._module(node, _conv_module(arguments, self.tensors), arguments["weight"], (arguments["input"],))
        if target is aten.linear.default and self._held(arguments, "weight", "bias"):
            return self._module(node, _linear_module(arguments, self.tensors), arguments["weight"],
                                (arguments["input"],))
        if target in BATCH_NORMS and self._is_eval_batchnorm2d(node, arguments):
            if target is not aten.batch_norm.default:
                self.tuple_norms.add(node)
            return self._module(node, _batchnorm_module(arguments, self.tensors), arguments["running_mean"],
                                (arguments["input"],))
        if target is operator.getitem and node.args[0] in self.tuple_norms:
            return self.env[node.args[0]]  # item 0 (the only one read) of a _native_batch_norm_legit_no_training
        if target in ACTIVATIONS:
            call = ACTIVATIONS[target](arguments)
            if call is not None:
                function, args, kwargs = call
                return self.graph.call_function(function, self._value(args), self._value(kwargs))
        if target in BINARY and len(node.args) == 2 and not node.kwargs:
            return self.graph.call_function(BINARY[target], self._value(node.args))
        if target in PASS_THROUGH and not node.kwargs:  # a clone to a memory format (.contiguous()) is no identity
            return self._value(node.args[0])
        return self.graph.call_function(target, self._value(node.args), self._value(node.kwargs))

    def _is_conv2d(self, node: fx.Node, arguments: Dict[str, Any]) -> bool:
        weight = arguments["weight"]
        return (self._held(arguments, "weight", "bias") and self.tensors[weight].dim() == 4
                and _rank(arguments["input"]) == 4
                and not arguments.get("transposed", False) and not any(arguments.get("output_padding", ())))

    def _is_eval_batchnorm2d(self, node: fx.Node, arguments: Dict[str, Any]) -> bool:
        if not self._held(arguments, "running_mean", "running_var", "weight", "bias") \
                or arguments["running_mean"] is None or arguments["running_var"] is None:
            return False
        if arguments.get("training", False) or _rank(arguments["input"]) != 4:
            return False
        # The decomposed form returns (output, unused statistics): only its output may be read.
        tuple_output = node.target is not aten.batch_norm.default
        return not tuple_output or all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)

    def _held(self, arguments: Dict[str, Any], *names: str) -> bool:
        """Whether each named argument is absent or a parameter, buffer or constant of the model."""
        return all(arguments.get(name) is None or arguments[name] in self.tensors for name in names)

    def _module(self, node: fx.Node, module: nn.Module, named_by: fx.Node, inputs: tuple) -> fx.Node:
        owner = self.names[named_by].rpartition(".")[0] or f"captured_{node.name}"
        name, copies = owner, 1
        while name in self.modules and not _same_module(self.modules[name], module):
            copies += 1  # the same weight used with other settings: a module of its own
            name = f"{owner}_{copies}"
        if name not in self.modules:
            self.modules[name] = module
            _set_path(self.holder, name, module)
        return self.graph.call_module(name, self._value(inputs))

    def _attach(self, name: str, tensor: torch.Tensor) -> str:
        """Put ``tensor`` on the holder at ``name`` (where nothing is yet) and return the name."""
        try:
            existing = self.holder.get_parameter(name) if isinstance(tensor, nn.Parameter) else \
                self.holder.get_buffer(name)
        except AttributeError:
            existing = None
        if existing is None:
            _set_path(self.holder, name, tensor)
        return name


def _arguments(node: fx.Node) -> Dict[str, Any]:
    """The node's arguments by their schema names, defaults filled in (an ATen overload), else {}."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    values.update(zip((a.name for a in schema.arguments), node.args))
    values.update(node.kwargs)
    return values


def _rank(node: Any) -> int:
    """The rank of the tensor an exported node computes (from its fake value), or -1."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else -1


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    """The tensor as a module parameter (the same object where it is one; else sharing its storage)."""
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _conv_module(a: Dict[str, Any], tensors: Dict[fx.Node, torch.Tensor]) -> nn.Conv2d:
    weight = tensors[a["weight"]]
    bias = tensors[a["bias"]] if a.get("bias") is not None else None
    groups = int(a["groups"])
    padding = a["padding"] if isinstance(a["padding"], str) else tuple(_pair(a["padding"]))
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=_pair(a["stride"]),
                     padding=padding, dilation=_pair(a["dilation"]), groups=groups, bias=bias is not None,
                     device="meta")  # no weights allocated: they are the model's
    conv.weight = _parameter(weight)
    if bias is not None:
        conv.bias = _parameter(bias)
    return conv


def _linear_module(a: Dict[str, Any], tensors: Dict[fx.Node, torch.Tensor]) -> nn.Linear:
    weight = tensors[a["weight"]]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=a["bias"] is not None, device="meta")
    linear.weight = _parameter(weight)
    if a["bias"] is not None:
        linear.bias = _parameter(tensors[a["bias"]])
    return linear


def _batchnorm_module(a: Dict[str, Any], tensors: Dict[fx.Node, torch.Tensor]) -> nn.BatchNorm2d:
    mean, var = tensors[a["running_mean"]], tensors[a["running_var"]]
    affine = a["weight"] is not None
    norm = nn.BatchNorm2d(mean.shape[0], eps=float(a["eps"]), momentum=float(a["momentum"]), affine=affine,
                          device="meta").eval()
    if affine:
        norm.weight, norm.bias = _parameter(tensors[a["weight"]]), _parameter(tensors[a["bias"]])
    norm.running_mean, norm.running_var = mean, var
    norm.num_batches_tracked = torch.zeros((), dtype=torch.long, device=mean.device)
    return norm


def _pair(value: Any) -> tuple:
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return (values[0], values[-1]) if len(values) in (1, 2) else tuple(values)


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """Both the same kind of module over the same tensors with the same settings."""
    return type(a) is type(b) and repr(a) == repr(b) and all(
        x is y for x, y in zip(list(a.parameters()) + list(a.buffers()), list(b.parameters()) + list(b.buffers())))


def _set_path(root: nn.Module, name: str, value: Any) -> None:
    """``root.<name> = value``, creating empty modules for the missing parents of a dotted name."""
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Module):
        module.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)
