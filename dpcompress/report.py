"""Human-readable text for the CLI: the chain table and export summaries."""

from __future__ import annotations

from typing import List

from dpcompress.graph.chain import Chain
from dpcompress.export import ExportReport


def _pair(value: tuple) -> str:
    return str(value[0]) if value[0] == value[1] else f"{value[0]}x{value[1]}"


def chain_table(chain: Chain) -> str:
    """One row per position: layer, conv geometry, activation, residual and barrier markers."""
    blocks = chain.valid_blocks()
    starting = {p: 0 for p in range(chain.num_positions + 1)}
    for start, _ in blocks:
        starting[start] += 1
    residual_marks = {}
    for r in chain.residuals:
        residual_marks.setdefault(r.start, []).append(f"skip>{r.end}")
        residual_marks.setdefault(r.end, []).append(f"+skip<{r.start}")
    header = f"{'pos':>4}  {'layer':<34} {'k':>3} {'s':>2} {'g':>5} {'in':>5} {'out':>5} {'HxW':>9}  " \
             f"{'act':<10} {'blocks':>6}  notes"
    lines: List[str] = [f"model: {chain.model}   input: {'x'.join(map(str, chain.input_shape))}   "
                        f"fingerprint: {chain.fingerprint()}", header, "-" * len(header)]
    lines.append(f"{0:>4}  {'(input)':<34} {'':>3} {'':>2} {'':>5} {'':>5} {'':>5} {'':>9}  {'':<10} "
                 f"{starting[0]:>6}  {' '.join(residual_marks.get(0, []))}")
    for u in chain.units:
        notes = list(residual_marks.get(u.position, []))
        next_unit = chain.units[u.position] if u.position < chain.num_positions else None
        if next_unit is not None and not next_unit.linked:
            notes.append(f"BARRIER: {next_unit.barrier}")
        size = f"{u.out_shape[2]}x{u.out_shape[3]}"
        act = u.activation or "-"
        if u.activation and u.position == chain.num_positions:
            act += " (kept)"
        name = u.name if len(u.name) <= 34 else "…" + u.name[-33:]
        lines.append(f"{u.position:>4}  {name:<34} {_pair(u.kernel):>3} {_pair(u.stride):>2} {u.groups:>5} "
                     f"{u.in_channels:>5} {u.out_channels:>5} {size:>9}  {act:<10} {starting[u.position]:>6}  "
                     f"{' '.join(notes)}")
    lines.append("")
    lines.append(f"{chain.num_positions} convs, {len(chain.activation_positions)} removable activations, "
                 f"{len(chain.residuals)} identity residuals, {len(blocks)} valid blocks "
                 f"('blocks' = valid blocks starting at that position)")
    return "\n".join(lines)


def export_summary(report: ExportReport, out: str) -> str:
    b, a = report.before, report.after
    lines = [
        f"wrote {out} ({report.size_bytes / 1e6:.2f} MB)",
        f"{'':<12}{'before':>14}{'after':>14}",
        f"{'conv layers':<12}{b.conv_layers:>14}{a.conv_layers:>14}",
        f"{'parameters':<12}{b.parameters:>14,}{a.parameters:>14,}",
        f"{'FLOPs':<12}{b.flops / 1e6:>13.1f}M{a.flops / 1e6:>13.1f}M",
    ]
    v = report.verification
    if v is not None:
        lines.append(f"verify: max abs error {v.max_abs_error:.3g}, max relative error {v.max_rel_error:.3g} "
                     f"(output scale {v.output_scale:.3g}): {'OK' if v.passed else 'FAILED'}")
    return "\n".join(lines)
