"""Human-readable text: the chain table, export summaries and the compress report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

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
    lines: List[str] = [f"model: {chain.model}   capture: {chain.capture}   "
                        f"input: {'x'.join(map(str, chain.input_shape))}   "
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


def shown_path(path: Path) -> str:
    """The path relative to the working directory where it lies under it (shorter to read)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def report_markdown(report: Dict[str, Any]) -> str:
    e = report["export"]
    v = e["verification"]
    lines = [
        f"# dpcompress report: {report['model'] or 'in-memory model'}", "",
        f"- input shape: {'x'.join(map(str, report['input_shape']))}; latency table: `{shown_path(Path(report['latency_table']))}`",
        f"- importance: {report['importance_method']}; budget: {report['budget_ms']:.4g} ms",
        f"- kept activations: {len(report['plan']['activations'])}; blocks: {len(report['plan']['boundaries']) - 1}",
        f"- pruning: {pruning_text(report['prune'], report['plan'].get('pruned') or [])}",
        "", "| | before | after |", "|---|---|---|",
        f"| predicted latency (ms) | {report['plan']['original_latency_ms']:.4g} | "
        f"{report['predicted_latency_ms']:.4g} |",
        f"| measured latency (ms, median) | {report['measured_original_ms']:.4g} | "
        f"{report['measured_compressed_ms']:.4g} |",
        f"| conv layers | {e['before']['conv_layers']} | {e['after']['conv_layers']} |",
        f"| parameters | {e['before']['parameters']:,} | {e['after']['parameters']:,} |",
        f"| FLOPs | {e['before']['flops'] / 1e6:.1f}M | {e['after']['flops'] / 1e6:.1f}M |",
        "",
        f"- predicted speed-up: {report['predicted_speedup']:.2f}x; "
        f"measured speed-up: {report['measured_speedup']:.2f}x",
        f"- verification: max relative error {v['max_rel_error']:.3g} ({'OK' if v['passed'] else 'FAILED'})",
    ]
    if report.get("submodule"):
        whole = report["whole_model_bench"]
        lines[3:3] = [f"- compressed submodule: `{report['submodule']}` (input "
                      f"{'x'.join(map(str, report['submodule_input_shape']))}); the table below is the submodule's"]
        lines.append(f"- export: {e['note']}")
        if whole:
            lines.append(f"- whole model in PyTorch: {whole['original']['median_ms']:.4g} ms before, "
                         f"{whole['compressed']['median_ms']:.4g} ms after: "
                         f"{whole['original']['median_ms'] / whole['compressed']['median_ms']:.2f}x")
    loop = report.get("closed_loop")
    if loop:
        lines += ["", f"Closed loop: the budget is {loop['budget_ratio']:.1%} of the original's measured latency "
                  f"in the same bench; {loop['reason']}.", "",
                  "| candidate | step | kept activations | blocks | pruned | importance | predicted speed-up | "
                  "measured speed-up (95% interval) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for index, c in enumerate(loop["candidates"], start=1):
            verdict = ("chosen" if c["chosen"] else "within" if c["within_budget"] and c["faster"] else
                       "no faster than the original" if not c["faster"] else "over the budget")
            low, high = c["measured_speedup_interval"]
            lines.append(f"| {index} | {c['step']} | {len(c['activations'])} | {len(c['boundaries']) - 1} | "
                         f"{len(c['pruned'])} | {c['importance'] or 0:.4g} | {c['predicted_speedup']:.2f}x | "
                         f"{c['measured_speedup']:.2f}x ({low:.2f}-{high:.2f}x) | {verdict} |")
    else:
        lines += ["", "Closed loop: off (--no-measure); the plan is the solver's, unmeasured before export."]
    accuracy = report["accuracy"]
    if accuracy:
        lines.append("- accuracy: " + ", ".join(f"{k} {100 * val:.2f}%" for k, val in sorted(accuracy.items())))
    else:
        lines.append("- accuracy: not measured (no --data given)")
    lines += ["", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def pruning_text(prune: bool, pruned: Sequence[int]) -> str:
    """How the report and the plan summary say what was pruned."""
    if not prune:
        return "off (no conv may be replaced by identity)"
    return (f"on; {len(pruned)} conv(s) replaced by identity ({' '.join(map(str, pruned))})" if pruned
            else "on; no conv replaced by identity")
