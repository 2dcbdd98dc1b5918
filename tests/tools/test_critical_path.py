"""scripts/gpu/critical_path.py: the per-kernel charges of a decode step, on hand-made traces
whose answer is known (BENCHMARKS.md quotes this script's tables)."""
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "critical_path.py"
spec = importlib.util.spec_from_file_location("critical_path", SCRIPT)
critical_path = importlib.util.module_from_spec(spec)
spec.loader.exec_module(critical_path)


def step(corr, t0, kernels):
    """One graph launch: (name, start, end) offsets from t0."""
    return [{"name": n, "start_ns": t0 + s, "end_ns": t0 + e, "correlation": corr, "in_graph": 1}
            for n, s, e in kernels]


def trace(kernels, steps=6):
    rows = []
    for i in range(steps):
        rows += step(i, i * 1000, kernels)
    # A prefill kernel outside any graph never counts.
    rows.append({"name": "prefill", "start_ns": 0, "end_ns": 10**6, "correlation": 99,
                 "in_graph": 0})
    return rows


def test_dependent_launches_are_charged_once_and_sum_to_the_step():
    # b starts while a runs (dependent launch) and ends after it; c after a 10 ns gap; d is a
    # side-branch kernel inside b.
    n, wall, idle, charge, busy, calls = critical_path.summarize(trace(
        [("a", 0, 100), ("b", 50, 300), ("d", 120, 200), ("c", 310, 400)]))
    assert n == 2  # 6 steps, the first 3 and the last dropped
    assert wall == 2 * 400
    assert idle == 2 * 10
    assert sum(charge.values()) == wall
    # d ends first inside b's run and takes that advance; b the rest; c its gap and run.
    assert charge == {"a": 200, "d": 200, "b": 200, "c": 200}
    assert busy["b"] == 2 * 250 and calls["b"] == 2
    assert "prefill" not in calls


def test_a_trace_without_graph_steps_has_no_windows():
    n, wall, *_ = critical_path.summarize(
        [{"name": "k", "start_ns": 0, "end_ns": 5, "correlation": 1, "in_graph": 0}])
    assert (n, wall) == (0, 0)


def test_layers_are_split_at_their_first_kernel_and_kinds_reported_apart():
    # Per step: a kernel before the first layer (dropped), then an indexer layer whose attention
    # waits 30 ns for the indexer's top-k after the queries' RoPE, then a plain layer that waits 5.
    kernels = [
        ("embed_tail", 0, 10),
        ("hc_pre_norm_q8_0", 10, 20), ("head_norm_rope", 20, 40), ("index_topk", 30, 70),
        ("attend_split_scores", 70, 90),
        ("hc_pre_norm_q8_0", 100, 110), ("head_norm_rope", 110, 130),
        ("attend_split_scores", 135, 150), ("hc_post_mix", 150, 160),
    ]
    stats = critical_path.layer_stats(trace(kernels))
    # 2 steady steps, one layer of each kind in each.
    assert stats[True] == (2, 80, 30)
    assert stats[False] == (2, 60, 5)


def test_a_layer_without_the_wait_kernels_has_a_span_but_no_wait():
    stats = critical_path.layer_stats(trace([
        ("hc_pre_norm_q8_0", 0, 10), ("gemv", 5, 50),
    ]))
    assert stats == {False: (2, 50, None)}


def test_split_layers_orders_by_start_and_keeps_side_kernels_in_their_layer():
    step = [("b", 30, 40), ("L", 0, 5), ("side", 10, 100), ("L", 50, 60), ("c", 55, 70)]
    layers = critical_path.split_layers(step, "L")
    assert [[k[0] for k in layer] for layer in layers] == [["L", "side", "b"], ["L", "c"]]


def test_sites_split_one_kernel_name_by_its_place_in_the_layer():
    # A layer: its first kernel, an attention post-mix (charged 15), a long FFN matvec with a
    # side kernel ending inside it, then the FFN post-mix (charged 25).
    kernels = [
        ("hc_pre_norm_q8_0", 0, 10), ("hc_post_mix", 5, 25), ("gemv", 20, 100),
        ("side", 30, 60), ("hc_post_mix", 90, 125),
    ]
    sites = critical_path.site_stats(trace(kernels))
    assert set(sites) == {False}
    plain = sites[False]
    # 2 steady steps, one layer each: (layers, charge, busy, end from the layer's start).
    assert plain["hc_post_mix#1"] == (2, 15, 20, 25)
    assert plain["hc_post_mix#2"] == (2, 25, 35, 125)
    assert plain["side#1"] == (2, 35, 30, 60)
    assert plain["gemv#1"] == (2, 40, 80, 100)
    # The charges of a layer that starts its step sum to its span.
    assert sum(v[1] for v in plain.values()) == 125


def test_the_gap_between_steps_is_the_median_host_time_per_token():
    # Steps every 1000 ns, each 400 ns long: 600 ns between one step's end and the next start;
    # one late step (a prefill between context points) does not move the median.
    rows = trace([("a", 0, 100), ("b", 100, 400)], steps=8)
    for r in rows:
        if r["correlation"] == 6:
            r["start_ns"] += 50_000
            r["end_ns"] += 50_000
    assert critical_path.step_gap_ns(rows) == 600
    assert critical_path.step_gap_ns(trace([("a", 0, 1)], steps=4)) is None


def test_site_bytes_give_each_listed_site_its_rate(tmp_path):
    f = tmp_path / "sites.csv"
    f.write_text("site,what,mb\nk#1,a matrix,35.65\nk#2,another,2.5\n")
    sites = critical_path.read_site_bytes(f)
    assert sites == {"k#1": ("a matrix", 35.65), "k#2": ("another", 2.5)}
    # 35.65 MB in 15.55 us: 2 293 GB/s (q_b in docs/speed-log.md, session 21).
    assert round(critical_path.site_rate(35.65, 15_550)) == 2293
    assert critical_path.site_rate(1.0, 0) == float("inf")


def test_the_q2_site_list_names_known_sites_with_positive_sizes():
    path = SCRIPT.parent / "decode_sites_q2.csv"
    sites = critical_path.read_site_bytes(path)
    assert sites["gemv_q8_0_q8x_nb1#3"][1] == 35.65
    assert all(mb > 0 for _, mb in sites.values())
