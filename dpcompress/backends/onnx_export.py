"""The two ONNX exports: the one the latency tables and benches time, and the one ``export`` ships.

Timing exports thousands of small blocks, so it takes the TorchScript exporter (``dynamo=False``,
opset 17, several times faster there), falling back to the dynamo exporter for an op it cannot export;
input ``x``, output ``y``. Shipping takes the dynamo exporter (the one torch maintains; it writes a
dynamic batch and a model's several outputs by name); input ``input``, outputs ``output`` or
``output_<i>``. The two graphs differ only where no time is spent on what the table prices: the
TorchScript graph carries ``Identity`` and ``Constant`` nodes, and spells global average pooling and
its flattening ``GlobalAveragePool``/``Flatten`` where the dynamo graph has ``ReduceMean``/``Reshape``.
tests/backends/test_onnx_export.py checks that this is all, for every model of the zoo and two
torchvision models.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Sequence

from dpcompress.fileio import PathLike

if TYPE_CHECKING:  # pragma: no cover
    import torch


def export_onnx_file(module: "torch.nn.Module", example: "torch.Tensor", path: "os.PathLike[str] | str",
                     fold_constants: bool = True) -> None:
    """``module`` as an ONNX model at ``path`` with input ``x`` and output ``y``.

    Written to a file, not to memory: a runtime reads it from there, so that no copy of the
    weights is held in Python while the runtime builds its own. Over 2 GB the weights go to
    files beside it, which runtimes read from the same folder.

    The TorchScript exporter (``dynamo=False``) is used: it is several times faster
    than the dynamo exporter for the small convolutions a latency table is made of.
    Where it cannot export an op (alexnet's adaptive pooling to 6x6 from a 1x1 map at a
    small input), the dynamo exporter is used, its nodes named by module scope as the
    TorchScript exporter names them (``/<submodule>/...``), which in-network timing reads.

    ``fold_constants=False`` leaves batch norms as nodes instead of folding them into the convs:
    ONNX Runtime fuses them into the same optimized graph, and the exporter's transient memory
    falls by about one copy of the weights (wide_resnet101_2: +1.5 GB over the model instead of
    +2.0 GB). Node names then differ where a fused node takes the norm's name, so in-network
    timing, which maps names to parts, keeps the folded export.
    """
    import torch

    try:
        with warnings.catch_warnings(), _no_graph_dump_on_failure(torch):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"],
                              opset_version=17, dynamo=False, do_constant_folding=fold_constants)
    except torch.onnx.OnnxExporterError:
        _dynamo_onnx_file(module, example, path)


def export_onnx_bytes(module: "torch.nn.Module", example: "torch.Tensor") -> bytes:
    """:func:`export_onnx_file` as bytes, for runtimes that read ONNX from memory (weights embedded)."""
    with tempfile.TemporaryDirectory(prefix="dpcompress_onnx_") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx_file(module, example, path)
        return path.read_bytes()


@contextlib.contextmanager
def _no_graph_dump_on_failure(torch: Any) -> Iterator[None]:
    """Silence the TorchScript exporter's ONNX log while it runs. torch 2.13 turns that log on for every
    export (it tests the function ``_jit_is_onnx_log_enabled`` instead of calling it), so an op it cannot
    export prints the whole graph to stderr, though the caller goes on with the dynamo exporter."""
    log = torch._C._jit_onnx_log
    torch._C._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        torch._C._jit_onnx_log = log


def _dynamo_onnx_file(module: "torch.nn.Module", example: "torch.Tensor", path: "os.PathLike[str] | str") -> None:
    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
            torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                              external_data=False)
    model = onnx.load(str(path))
    for node in model.graph.node:
        # namespace ": pkg.Net/dpc_block_0: torch.nn.modules.conv.Conv2d/conv2d: aten.conv2d.default": the root,
        # then one "name: class" per submodule, then the op.
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        scopes = [segment.split(":")[0].strip() for segment in namespace.split("/")[1:-1]]
        if scopes:
            node.name = "/" + "/".join(scopes) + "/" + node.name
    onnx.save(model, str(path))


def write_onnx(model: "torch.nn.Module", path: PathLike, input_shape: Sequence[int], dynamic_batch: bool = False) -> None:
    """The model as one self-contained ONNX file at ``path`` (static shapes unless ``dynamic_batch``).
    Written straight to the file: the weights are not held in memory once more as bytes."""
    import torch

    sample = torch.randn(*input_shape)
    with torch.no_grad():
        count = len(flat_tensors(model.eval()(sample)))
    output_names = ["output"] if count == 1 else [f"output_{index}" for index in range(count)]
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The exporter prints progress lines, and on failure the whole captured graph.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(model.eval(), (sample,), str(path), dynamo=True, external_data=False,
                              input_names=["input"], output_names=output_names, dynamic_shapes=dynamic_shapes)


def onnx_bytes(model: "torch.nn.Module", input_shape: Sequence[int], dynamic_batch: bool = False) -> bytes:
    """:func:`write_onnx` as bytes (what a TensorRT build takes)."""
    with tempfile.TemporaryDirectory(prefix="dpcompress_onnx_") as folder:
        path = Path(folder) / "model.onnx"
        write_onnx(model, path, input_shape, dynamic_batch)
        return path.read_bytes()


def flat_tensors(value: object) -> List["torch.Tensor"]:
    """The tensors of a model's output in the order exporters flatten them (dicts by insertion order)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat_tensors(v)]
    return []
