"""compress with pruning options on a tiny zoo model: the pruned search space reaches a smaller latency,
its plan prunes convs, exports verified, and says so; tables are reused only with the same setting."""

import pytest

from dpcompress.cli import plan_summary
from dpcompress.errors import UserError
from dpcompress.graph.trace import trace_model
from dpcompress.latency.profile import profile_table
from dpcompress.pipeline import CompressSettings, compress_model
from dpcompress.search.importance import ImportanceSettings, compute_importance
from dpcompress.search.solver import frontier
from dpcompress.tables import read_importance_table, read_latency_table
from tests.cost_backend import CostBackend
from tests.digits_helpers import INPUT_SHAPE, TINY_SPEC, trained_tiny


def test_compress_prunes_to_reach_a_budget_the_unpruned_space_cannot(tmp_path):
    # The table and the uniform importance are made first, so that the budget can be the smallest latency the
    # pruned search space reaches (deterministic: the cost backend); compress finds and reuses the table.
    traced = trace_model(trained_tiny(), INPUT_SHAPE, spec=TINY_SPEC)
    tables = tmp_path / "tables"
    profile_table(traced.chain, CostBackend(), tables / "latency.csv", warmup=0, iters=1, prune=True)
    table = read_latency_table(tables / "latency.csv")
    compute_importance(traced, ImportanceSettings(method="uniform", prune=True), tmp_path / "importance.csv")
    positions = traced.chain.activation_positions
    smallest = frontier(table, read_importance_table(tmp_path / "importance.csv"), positions)[0][0]
    assert smallest < frontier(table, None, positions)[0][0]  # out of reach without pruning

    settings = CompressSettings(budget_ms=smallest, budget_ratio=None, backend=CostBackend(), warmup=0, iters=1,
                                tables_dir=str(tables), measure=False, prune=None)  # None: on, as a conv is reducible
    out = tmp_path / "out"
    result = compress_model(trained_tiny(), INPUT_SHAPE, out, settings, model_spec=TINY_SPEC, say=lambda line: None)
    report = result.report
    assert report["latency_table"] == str(tables / "latency.csv") and report["prune"] is True
    assert result.plan.pruned and report["plan"]["pruned"] == result.plan.pruned
    assert report["predicted_latency_ms"] == pytest.approx(smallest)
    assert report["export"]["verification"]["passed"]
    assert read_importance_table(out / "importance.csv").pruned_importance  # uniform, priced for pruning
    pruned = " ".join(map(str, result.plan.pruned))
    assert f"replaced by identity ({pruned})" in (out / "report.md").read_text()
    assert f"pruned convs: {len(result.plan.pruned)} replaced by identity ({pruned})" in plan_summary(result.plan)

    # Without pruning, the table with options serves as well (its options dropped): the budget is out of reach.
    lines = []
    with pytest.raises(UserError, match="smallest achievable latency"):
        compress_model(trained_tiny(), INPUT_SHAPE, tmp_path / "off", CompressSettings(
            budget_ms=smallest, budget_ratio=None, backend=CostBackend(), warmup=0, iters=1, tables_dir=str(tables),
            measure=False, prune=False), model_spec=TINY_SPEC, say=lines.append)
    assert f"[2/7] latency table: reusing {tables / 'latency.csv'}" in lines
    assert not (tmp_path / "off" / "latency.csv").exists()


def test_a_table_without_pruning_options_is_profiled_again_with_them_saying_so(tmp_path):
    traced = trace_model(trained_tiny(), INPUT_SHAPE, spec=TINY_SPEC)
    tables = tmp_path / "tables"
    profile_table(traced.chain, CostBackend(), tables / "latency.csv", warmup=0, iters=1, prune=False)
    lines = []
    settings = CompressSettings(budget_ratio=0.9, backend=CostBackend(), warmup=0, iters=1, tables_dir=str(tables),
                                measure=False)  # pruning by default: the model has reducible convs
    result = compress_model(trained_tiny(), INPUT_SHAPE, tmp_path / "out", settings, model_spec=TINY_SPEC,
                            say=lines.append)
    assert result.report["prune"] is True and result.report["latency_table"] == str(tmp_path / "out" / "latency.csv")
    assert any("profiling" in line for line in lines)
    assert f"      with pruning options, which {tables / 'latency.csv'} lacks (--no-prune uses it as it is)" in lines
    assert read_latency_table(tmp_path / "out" / "latency.csv").pruned_latency_ms
