"""Stage compositions shared by the CLI commands: spec in, files out."""

from __future__ import annotations

from typing import Optional

from dpcompress.export import ExportReport, export_plan
from dpcompress.models import build_model
from dpcompress.plan import check_plan_against_chain, load_plan
from dpcompress.rewrite import merge_reference, reference_model
from dpcompress.trace import parse_input_shape, trace_model


def export_from_spec(model_spec: str, weights: Optional[str], input_shape: str, plan_path: str, fmt: str,
                     out: str, verify: bool = False, tolerance: float = 1e-3, dynamic_batch: bool = False,
                     precision: str = "fp32", checkpoint: Optional[str] = None) -> ExportReport:
    """Build the model, check the plan against its chain, merge, (verify,) and write ``out``."""
    shape = parse_input_shape(input_shape)
    plan = load_plan(plan_path)
    model = build_model(model_spec, weights)
    traced = trace_model(model, shape, spec=model_spec)
    check_plan_against_chain(plan, traced.chain, source=plan_path)
    if checkpoint is not None:
        from dpcompress.finetune import load_finetuned

        reference = load_finetuned(checkpoint, traced, plan)
    else:
        reference = reference_model(traced, plan)
    reference.eval()
    merged = merge_reference(reference)
    return export_plan(model, reference, merged, fmt, out, shape, verify=verify, tolerance=tolerance,
                       dynamic_batch=dynamic_batch, precision=precision)
