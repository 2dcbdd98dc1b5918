"""scripts/gpu/prefill_path.py: where a prefill's time goes, on hand-made traces whose answer
is known (BENCHMARKS.md quotes this script's tables)."""
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "prefill_path.py"
spec = importlib.util.spec_from_file_location("prefill_path", SCRIPT)
prefill_path = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prefill_path)

MS = 1_000_000


def rows(kernels, in_graph=0, t0=0):
    return [{"name": n, "start_ns": t0 + s, "end_ns": t0 + e, "correlation": 0, "in_graph": in_graph}
            for n, s, e in kernels]


def test_side_stream_kernels_are_charged_what_they_add_and_charges_sum_to_the_wall():
    # gemm runs 0-100; a side-stream norm (10-40) ends inside it; attend follows after a gap
    # of 5 ns and ends at 200; a side-stream gather (150-260) outlasts it.
    n, wall, charge, busy, calls = prefill_path.summarize(rows(
        [("gemm", 0, 100), ("norm", 10, 40), ("attend", 105, 200), ("gather", 150, 260)]))
    assert n == 4 and wall == 260
    assert charge == {"norm": 40, "gemm": 60, "attend": 100, "gather": 60}
    assert sum(charge.values()) == wall
    assert busy == {"gemm": 100, "norm": 30, "attend": 95, "gather": 110}
    assert calls == {"gemm": 1, "norm": 1, "attend": 1, "gather": 1}


def test_the_longest_burst_is_reported_and_graph_kernels_never_count():
    # Two spans 3 ms apart (the host's work between them), the second longer; a decode graph
    # kernel inside the second span's time does not count.
    first = rows([("gemm", 0, 1 * MS)])
    second = rows([("gemm", 0, 2 * MS), ("attend", 2 * MS, 3 * MS)], t0=4 * MS)
    graph = rows([("gemv", 5 * MS, 8 * MS)], in_graph=1)
    n, wall, charge, _, calls = prefill_path.summarize(first + second + graph)
    assert n == 2 and wall == 3 * MS
    assert charge == {"gemm": 2 * MS, "attend": 1 * MS}
    assert "gemv" not in calls


def test_kernels_closer_than_the_gap_stay_one_burst():
    n, wall, _, _, _ = prefill_path.summarize(rows([("a", 0, 10), ("b", 10 + 2 * MS - 1, 3 * MS)]))
    assert n == 2 and wall == 3 * MS


def test_a_trace_of_graphs_only_has_no_prefill():
    assert prefill_path.summarize(rows([("gemv", 0, 10)], in_graph=1)) is None
