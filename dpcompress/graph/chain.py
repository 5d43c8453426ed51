"""The Chain: a model's mergeable trunk as plain objects (no torch needed to use it).

Positions follow docs/formats.md: the trunk convolutions are c1..cL in execution order;
position p is the tensor after conv p with its BatchNorm (and any identity
residual closing there), where the activation of conv p sits; position 0 is the
trunk's input. A block (i, j) merges convs i+1..j into one convolution.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dpcompress.errors import UserError


@dataclass(frozen=True)
class ConvUnit:
    """Conv ``position`` with its BatchNorm and activation, as found in the model."""

    position: int
    name: str  # qualified name of the nn.Conv2d
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    bias: bool
    in_shape: Tuple[int, int, int, int]  # N, C, H, W of the conv's input
    out_shape: Tuple[int, int, int, int]
    batchnorm: Optional[str] = None  # qualified name of the BatchNorm2d folded into this conv
    activation: Optional[str] = None  # activation kind: "ReLU", "ReLU6", "SiLU", ...
    # True when this conv reads position ``position - 1`` directly, so a block may
    # run across that position. False means a barrier sits in between.
    linked: bool = False
    barrier: Optional[str] = None  # why position ``position - 1`` cannot be crossed

    @property
    def reducible(self) -> bool:
        """Whether this conv (with its BatchNorm) may be replaced by identity: stride 1 and its output
        the shape of its input (channels, height, width). Kernel, padding, dilation and groups do not
        matter: the identity takes the conv's place, and its block merges the convs that remain."""
        return self.stride == (1, 1) and tuple(self.in_shape[1:]) == tuple(self.out_shape[1:])


@dataclass(frozen=True)
class Residual:
    """Identity shortcut from position ``start`` (the input of conv start+1) added at position ``end``."""

    start: int
    end: int


@dataclass
class Chain:
    model: Optional[str]
    input_shape: Tuple[int, ...]
    units: List[ConvUnit]
    residuals: List[Residual] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # barriers and ops the tracer did not know
    capture: str = "fx"  # how the model's graph was taken: torch.fx ("fx") or torch.export ("export")

    @property
    def num_positions(self) -> int:
        """L: the number of trunk convolutions (positions run 0..L)."""
        return len(self.units)

    def unit(self, position: int) -> ConvUnit:
        """The conv unit whose output is ``position`` (1 <= position <= L)."""
        return self.units[position - 1]

    @property
    def activation_positions(self) -> List[int]:
        """Positions 1..L-1 holding an activation that a plan may remove.

        The activation at L (if any) ends the trunk; no merge needs it gone, so it stays.
        """
        return [u.position for u in self.units[:-1] if u.activation is not None]

    def reducible_positions(self) -> List[int]:
        """The positions whose conv a plan may prune (replace by identity), ascending."""
        return [u.position for u in self.units if u.reducible]

    def is_valid_block(self, start: int, end: int) -> bool:
        """Whether convs start+1..end can merge into one exact convolution."""
        if not 0 <= start < end <= self.num_positions:
            return False
        if not all(self.unit(p).linked for p in range(start + 2, end + 1)):
            return False
        for r in self.residuals:
            inside = start <= r.start and r.end <= end
            crosses = start < r.start < end or start < r.end < end
            if crosses and not inside:
                return False
        return True

    def valid_blocks(self) -> List[Tuple[int, int]]:
        """Every valid block (i, j), sorted; these are the rows of a latency table."""
        blocks = []
        for i in range(self.num_positions):
            for j in range(i + 1, self.num_positions + 1):
                if not self.unit(j).linked and j > i + 1:
                    break  # a barrier before conv j blocks every longer block too
                if self.is_valid_block(i, j):
                    blocks.append((i, j))
        return blocks

    def residuals_inside(self, start: int, end: int) -> List[Residual]:
        return sorted((r for r in self.residuals if start <= r.start and r.end <= end), key=lambda r: r.end)

    def fingerprint(self) -> str:
        """Hash of the structure (shapes, links, residuals), independent of names and weights."""
        structure = {
            "input_shape": list(self.input_shape),
            "units": [
                [u.in_channels, u.out_channels, list(u.kernel), list(u.stride), list(u.padding),
                 list(u.dilation), u.groups, list(u.in_shape), list(u.out_shape),
                 u.activation, u.linked]
                for u in self.units
            ],
            "residuals": [[r.start, r.end] for r in self.residuals],
        }
        blob = json.dumps(structure, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> Dict[str, Any]:
        blocks = self.valid_blocks()
        return {
            "model": self.model,
            "capture": self.capture,
            "input_shape": list(self.input_shape),
            "num_positions": self.num_positions,
            "fingerprint": self.fingerprint(),
            "activation_positions": self.activation_positions,
            "reducible_positions": self.reducible_positions(),
            "valid_blocks": [list(b) for b in blocks],
            "num_valid_blocks": len(blocks),
            "residuals": [[r.start, r.end] for r in self.residuals],
            "layers": [_unit_json(u) for u in self.units],
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Chain":
        try:
            units = [
                ConvUnit(
                    position=int(d["position"]), name=d["name"],
                    in_channels=int(d["in_channels"]), out_channels=int(d["out_channels"]),
                    kernel=_pair(d["kernel"]), stride=_pair(d["stride"]), padding=_pair(d["padding"]),
                    dilation=_pair(d["dilation"]), groups=int(d["groups"]), bias=bool(d["bias"]),
                    in_shape=tuple(int(x) for x in d["in_shape"]),  # type: ignore[arg-type]
                    out_shape=tuple(int(x) for x in d["out_shape"]),  # type: ignore[arg-type]
                    batchnorm=d.get("batchnorm"), activation=d.get("activation"),
                    linked=bool(d["linked"]), barrier=d.get("barrier"),
                )
                for d in data["layers"]
            ]
            residuals = [Residual(int(s), int(e)) for s, e in data.get("residuals", [])]
            return cls(model=data.get("model"), input_shape=tuple(data["input_shape"]),
                       units=units, residuals=residuals, notes=list(data.get("notes", [])),
                       capture=str(data.get("capture", "fx")))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"chain JSON is malformed ({err!r}); regenerate it with `dpcompress trace --json`") from err


def _pair(value: Sequence[int]) -> Tuple[int, int]:
    a, b = value
    return int(a), int(b)


def _unit_json(u: ConvUnit) -> Dict[str, Any]:
    d = asdict(u)
    for key in ("kernel", "stride", "padding", "dilation", "in_shape", "out_shape"):
        d[key] = list(d[key])
    return d
