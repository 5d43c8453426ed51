"""The plan: which activations stay and where the merged network splits into blocks.

JSON format ``dpcompress-plan/1`` (docs/formats.md). A plan written by hand with only
``activations`` and ``boundaries`` is valid; ``num_positions`` then defaults to the
last boundary, ``pruned`` to none and the other fields to None (``solve_seconds`` to 0).

``pruned`` (LayerMerge's search space) lists the convs replaced by identity, with their
BatchNorms; each lies in exactly one block, which merges the convs of the block that remain.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from dpcompress.graph.chain import Chain
from dpcompress.errors import UserError
from dpcompress.fileio import PathLike, write_json_atomic

PLAN_FORMAT = "dpcompress-plan/1"


@dataclass
class Plan:
    activations: List[int]  # kept activation positions strictly between 0 and L, sorted
    boundaries: List[int]  # block ends of the merged net, sorted, from 0 to L; contains every activation
    num_positions: int
    model: Optional[str] = None
    chain_fingerprint: Optional[str] = None
    budget_ms: Optional[float] = None
    latency_ms: Optional[float] = None  # predicted: sum of the table latencies of the blocks
    importance: Optional[float] = None  # sum of the importance of the segments
    original_latency_ms: Optional[float] = None
    solve_seconds: float = 0.0
    pruned: List[int] = field(default_factory=list)  # convs replaced by identity, sorted
    format: str = field(default=PLAN_FORMAT)

    @property
    def blocks(self) -> List[tuple]:
        """The merged blocks (i, j), one per pair of consecutive boundaries."""
        return list(zip(self.boundaries[:-1], self.boundaries[1:]))

    @property
    def segments(self) -> List[tuple]:
        """The segments (a_t, a_t+1) between consecutive kept activations (with 0 and L)."""
        ends = [0, *self.activations, self.num_positions]
        return list(zip(ends[:-1], ends[1:]))

    def pruned_in(self, start: int, end: int) -> Tuple[int, ...]:
        """The pruned convs of block or segment (start, end): positions start+1..end, ascending."""
        return tuple(p for p in self.pruned if start < p <= end)

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": self.format,
            "model": self.model,
            "chain_fingerprint": self.chain_fingerprint,
            "num_positions": self.num_positions,
            "activations": list(self.activations),
            "boundaries": list(self.boundaries),
            "pruned": list(self.pruned),
            "budget_ms": self.budget_ms,
            "latency_ms": self.latency_ms,
            "importance": self.importance,
            "original_latency_ms": self.original_latency_ms,
            "solve_seconds": self.solve_seconds,
        }


def unchanged_plan(chain: Chain) -> Plan:
    """The plan that changes nothing: every activation kept, every conv a block of its own."""
    L = chain.num_positions
    return Plan(activations=[p for p in chain.activation_positions if 0 < p < L], boundaries=list(range(L + 1)),
                num_positions=L, chain_fingerprint=chain.fingerprint())


def plan_from_json(data: Any, source: str = "plan") -> Plan:
    """Build a Plan from parsed JSON, with one clear UserError for each malformed field."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with 'activations' and 'boundaries'")
    fmt = data.get("format", PLAN_FORMAT)
    if fmt != PLAN_FORMAT:
        raise UserError(f"{source}: unknown plan format {fmt!r}; expected {PLAN_FORMAT!r}")
    for key in ("activations", "boundaries"):
        if key not in data:
            raise UserError(f"{source}: missing key '{key}'; a plan needs at least 'activations' and 'boundaries'")
    activations = _int_list(data["activations"], "activations", source)
    boundaries = _int_list(data["boundaries"], "boundaries", source)
    pruned = _int_list(data.get("pruned", []), "pruned", source)
    if not boundaries:
        raise UserError(f"{source}: 'boundaries' is empty; it must run from 0 to the number of convs")
    num_positions = data.get("num_positions")
    if num_positions is None:
        num_positions = boundaries[-1]
    elif not _is_int(num_positions):
        raise UserError(f"{source}: 'num_positions' must be an integer, got {num_positions!r}")
    plan = Plan(
        activations=activations,
        boundaries=boundaries,
        num_positions=num_positions,
        model=_optional_str(data, "model", source),
        chain_fingerprint=_optional_str(data, "chain_fingerprint", source),
        budget_ms=_optional_number(data, "budget_ms", source),
        latency_ms=_optional_number(data, "latency_ms", source),
        importance=_optional_number(data, "importance", source),
        original_latency_ms=_optional_number(data, "original_latency_ms", source),
        solve_seconds=_optional_number(data, "solve_seconds", source) or 0.0,
        pruned=pruned,
    )
    check_plan_structure(plan, source)
    return plan


def load_plan(path: PathLike) -> Plan:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(f"cannot read plan {path}: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err}); fix the file or re-run `dpcompress solve`") from err
    return plan_from_json(data, str(path))


def save_plan(path: PathLike, plan: Plan) -> None:
    write_json_atomic(path, plan.to_json())


def check_plan_structure(plan: Plan, source: str = "plan") -> None:
    """Checks that need no model: sorted boundaries from 0 to L, activations among them, pruned
    convs sorted and inside the chain (every position 1..L lies in exactly one block)."""
    b, L = plan.boundaries, plan.num_positions
    if not b or b[0] != 0 or b[-1] != L:
        raise UserError(f"{source}: boundaries must start at 0 and end at num_positions={L}, got {b}")
    if any(x >= y for x, y in zip(b, b[1:])):
        raise UserError(f"{source}: boundaries must be strictly increasing, got {b}")
    a = plan.activations
    if any(x >= y for x, y in zip(a, a[1:])):
        raise UserError(f"{source}: activations must be strictly increasing, got {a}")
    outside = [p for p in a if not 0 < p < L]
    if outside:
        raise UserError(f"{source}: activation position {outside[0]} is not strictly between 0 and {L}")
    not_boundary = sorted(set(a) - set(b))
    if not_boundary:
        raise UserError(f"{source}: kept activation {not_boundary[0]} is not a block boundary; "
                        "add it to 'boundaries'")
    pruned = plan.pruned
    if any(x >= y for x, y in zip(pruned, pruned[1:])):
        raise UserError(f"{source}: pruned positions must be strictly increasing, got {pruned}")
    outside = [p for p in pruned if not 0 < p <= L]
    if outside:
        raise UserError(f"{source}: pruned position {outside[0]} lies in no block; "
                        f"the convs are at positions 1..{L}")


def check_plan_against_chain(plan: Plan, chain: Chain, source: str = "plan") -> None:
    """Raise UserError unless the plan fits the model's chain (same structure, valid blocks)."""
    fingerprint = chain.fingerprint()
    if plan.chain_fingerprint is not None and plan.chain_fingerprint != fingerprint:
        raise UserError(f"{source} was made for another model (chain fingerprint {plan.chain_fingerprint}, "
                        f"this model has {fingerprint}); solve again for this model")
    if plan.num_positions != chain.num_positions:
        raise UserError(f"{source} has {plan.num_positions} positions but the model has "
                        f"{chain.num_positions} convs; solve again for this model")
    check_plan_structure(plan, source)
    for start, end in plan.blocks:
        if not chain.is_valid_block(start, end):
            raise UserError(f"{source}: block ({start}, {end}) cannot be merged into one conv in this model; "
                            "split it with more boundaries")
    eligible = set(chain.activation_positions)
    for p in plan.activations:
        if p not in eligible:
            raise UserError(f"{source}: position {p} holds no removable activation in this model")
    reducible = set(chain.reducible_positions())
    for p in plan.pruned:
        if p not in reducible:
            unit = chain.unit(p)
            raise UserError(f"{source}: conv {p} ({unit.name}) cannot be pruned: replacing it by identity "
                            f"needs stride 1 and equal input and output shapes, it has stride "
                            f"{unit.stride[0]}x{unit.stride[1]}, input {_shape(unit.in_shape)}, "
                            f"output {_shape(unit.out_shape)}")


def _shape(shape: Tuple[int, ...]) -> str:
    return "x".join(map(str, shape[1:]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, key: str, source: str) -> List[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise UserError(f"{source}: '{key}' must be a list of integer positions, got {value!r}")
    return list(value)


def _optional_str(data: Dict[str, Any], key: str, source: str) -> Optional[str]:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{source}: '{key}' must be a string or null, got {value!r}")
    return value


def _optional_number(data: Dict[str, Any], key: str, source: str) -> Optional[float]:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{source}: '{key}' must be a finite number or null, got {value!r}")
    return float(value)
