"""The benchmark command and the GPU records it made (mlbook/records)."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mlbook as ml
from mlbook import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_on_the_cpu_and_every_variant_matches_float64(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--device",
                "cpu",
                "--workloads",
                "sinusoid,sinusoid-fo,sinusoid-reptile",
                "--rounds",
                "1",
                "--round-seconds",
                "0.02",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m mlbook bench --device cpu")
    rows = {(r["workload"], r["variant"]): r for r in record["rows"]}
    for name in ("sinusoid", "sinusoid-fo", "sinusoid-reptile"):
        for variant in ("mlbook", "torch.func vmap", "per-task loop"):
            assert (name, variant) in rows
        assert rows[name, "per-task loop"]["speedup_vs_loop"] == pytest.approx(1.0)
    for r in record["rows"]:  # an MLP in float32: rounding only
        # Reptile's update is measured as theta_new - theta_old, a difference
        # of float32 numbers some 400 times larger (in norm): 1e-5 is their rounding
        tol = 1e-4 if r["workload"] == "sinusoid-reptile" else 1e-5
        assert r["rel_err_vs_float64"] < tol, r
        assert r["ms_per_step"] > 0


def test_a_run_cut_short_keeps_the_workloads_it_finished(tmp_path, monkeypatch):
    # A GPU run under a time limit may be killed mid-way: the JSON is
    # rewritten after every workload, so what finished is kept
    out, timed = tmp_path / "bench.json", []
    real = bench.run_workload

    def run_workload(w, *args):
        if timed:  # the second workload: as if the limit struck here
            raise KeyboardInterrupt
        timed.append(w["name"])
        return real(w, *args)

    monkeypatch.setattr(bench, "run_workload", run_workload)
    args = ["--device", "cpu", "--workloads", "sinusoid-fo,sinusoid"]
    args += ["--rounds", "1", "--round-seconds", "0.02", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    record = json.loads(out.read_text())
    assert {r["workload"] for r in record["rows"]} == {"sinusoid-fo"}
    assert record["command"] == "python -m mlbook bench " + " ".join(args)


def test_bench_refuses_unknown_workloads_and_gpu_only_options():
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--workloads", "imagenet"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--experiments"])


def test_count_ops_sees_the_levers_cut_the_operations(tmp_path, needs_compile):
    # the CUDA form of the step, counted on the CPU: the levers (fused block,
    # first layer as a matmul) replace batch norm's and max-pool's many small
    # operations by a few compiled calls
    cpu = torch.device("cpu")
    w = bench.workload("conv4", cpu)
    plain, levers = (bench.count_ops(w, cpu, on) for on in (False, True))
    assert plain["compiled_calls"] == 0 < levers["compiled_calls"]
    assert levers["ops"] < plain["ops"] / 2, (plain, levers)
    assert levers["m_elements_in"] < plain["m_elements_in"] / 2
    with pytest.raises(ValueError, match="Conv4 MAML"):
        bench.count_ops(bench.workload("conv4-reptile", cpu), cpu)
    out = tmp_path / "ops.json"
    argv = ["--device", "cpu", "--count-ops", "--workloads", "conv4", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["op_counts"]
    assert [(r["variant"], r["num_tasks"]) for r in rows] == [
        ("mlbook unfused", 32),  # the CUDA meta-batch
        ("levers combined", 32),
    ]
    # the dispatcher's counts: the same torch counts the shipped record again
    # (the step in its CUDA form, all tasks in one pass, on this CPU too)
    record = bench.load_record("bench-cpu-op-counts")
    if record["torch"] == torch.__version__:
        counts = record["op_counts"]
        want = {r["variant"]: r["ops"] for r in counts if r["workload"] == "conv4"}
        assert {r["variant"]: r["ops"] for r in rows} == want


def test_gpu_script_names_only_variants_the_benchmark_has():
    # scripts/gpu_checks.sh runs where GPU time is scarce: a label there that
    # the benchmark lacks would cost a run (--only refuses it; --skip would
    # time a variant meant to be left out). Checked here, without a GPU.
    cuda = torch.device("cuda")  # variants() reads only the device's type
    known = {"higher"}  # present when higher is installed
    for name in bench.WORKLOADS:
        w = bench.workload(name, torch.device("cpu"))
        w["compile"] = True
        for experiments in (False, True):
            known |= set(bench.variants(w, cuda, experiments))
    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    lists = re.findall(r'--(?:only|skip) "([^"]+)"', script)
    assert len(lists) >= 5
    for labels in lists:
        assert set(labels.split(",")) <= known, labels


def test_shipped_records_name_their_command_and_device():
    names = bench.records()
    assert {"bench-h200", "bench-cpu"} <= set(names)
    for name in names:
        r = bench.load_record(name)
        assert r["command"].startswith("python -m mlbook bench"), name
        assert r["commit"] and not r["commit"].endswith("-dirty"), name
        if "h200" in name:
            assert r["device_name"] == "NVIDIA H200", name
        else:
            threads = 2 if name.endswith("-2threads") else 1
            assert r["device"] == "cpu" and r["threads"] == threads, name
    with pytest.raises(ValueError, match="no benchmark record"):
        bench.load_record("bench-tpu")


def test_readme_speed_table_matches_the_record():
    # each row names the record (one benchmark run) its figures come from
    columns = [
        "per-task loop",
        "torch.func vmap",
        "mlbook",
        "vmap + graph",
        "mlbook + graph",
    ]
    workloads = {
        "sinusoid MAML": "sinusoid",
        "Omniglot 5w1s MAML": "conv4",
        "Omniglot 20w1s MAML": "conv4-20w",
        "Omniglot 5w1s first-order": "conv4-fo",
        "Omniglot 5-way Reptile": "conv4-reptile",
    }
    seen = 0
    for line in (ROOT / "README.md").read_text().splitlines():
        key = next(
            (w for prefix, w in workloads.items() if line.startswith(f"| {prefix}")),
            None,
        )
        if key is None:
            continue
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")[1:]]
        if len(cells) != len(columns) + 1:  # a row of the CPU table
            continue
        *cells, name = cells
        rows = {
            (r["workload"], r["variant"]): r["ms_per_step"]
            for r in bench.load_record(name)["rows"]
        }
        for variant, cell in zip(columns, cells):
            if cell == "-":
                assert (key, variant) not in rows
                continue
            decimals = len(cell.split(".")[1])
            assert float(cell) == round(rows[key, variant], decimals), (key, variant)
        seen += 1
    assert seen == len(workloads)


def test_readme_second_derivative_figures_match_their_records():
    text = " ".join((ROOT / "README.md").read_text().split())
    after = {
        (r["workload"], r["variant"]): r
        for r in bench.load_record("bench-h200-conv4")["rows"]
    }
    before = {
        (r["workload"], r["variant"]): r
        for r in bench.load_record("bench-h200")["rows"]
    }
    old = [
        after[w, bench.PLAIN_DOUBLE + " + graph"]["ms_per_step"]
        for w in ("conv4", "conv4-20w")
    ]
    new = [after[w, "mlbook + graph"]["ms_per_step"] for w in ("conv4", "conv4-20w")]
    assert f"{old[0]:.2f} and {old[1]:.2f} ms in the graph" in text
    assert f"worth {old[0] / new[0]:.2f}x and {old[1] / new[1]:.2f}x" in text
    loop = [
        before[w, v]["ms_per_step"]
        for w in ("conv4", "conv4-20w")
        for v in ("per-task loop", "torch.func vmap")
    ]
    assert "({:.1f} and {:.1f} ms; {:.1f} and {:.1f} ms)".format(*loop) in text
    tuned = {
        r["workload"]: r["ms_per_step"]
        for r in bench.load_record("bench-h200-conv4-cudnn-benchmark")["rows"]
        if r["variant"] == "mlbook + graph"
    }
    assert f"({tuned['conv4']:.2f} and {tuned['conv4-20w']:.1f} ms," in text


def _record_ms(name):
    return {
        (r["workload"], r["variant"]): r["ms_per_step"]
        for r in bench.load_record(name)["rows"]
    }


def test_readme_lever_figures_match_their_records():
    # CUDA's defaults: the passes differentiated once compiled (with the
    # block's one-pass statistics), mlbook.fused_block, the first layer as a
    # matmul
    text = " ".join((ROOT / "README.md").read_text().split())
    now = {
        (r["workload"], r["variant"]): r
        for r in bench.load_record("bench-h200-defaults")["rows"]
    }
    loads = ("conv4", "conv4-20w", "conv4-fo", "conv4-reptile")
    ms = {k: r["ms_per_step"] for k, r in now.items()}
    eager = [ms[w, bench.UNCOMPILED + " + graph"] for w in loads]
    on = [ms[w, "mlbook + graph"] for w in loads]
    said = "(`{}`): {:.2f}, {:.2f}, {:.2f} and {:.2f} ms"
    assert said.format(bench.UNCOMPILED, *eager) in text
    ratios = [a / b for a, b in zip(eager, on)]
    assert (
        "worth {:.2f}x, {:.2f}x, {:.2f}x and {:.2f}x, in less memory".format(*ratios)
        in text
    )
    assert all(r > 1.05 for r in ratios)
    # the targets, as the README states them
    assert on[0] <= 5 and f"reached ({on[0]:.2f} ms" in text
    assert 1 < on[1] / 20 < 1.01
    assert f"not, by about half a percent ({on[1]:.2f} ms)" in text
    mib = [
        now[w, v]["peak_mib"]
        for w in ("conv4", "conv4-20w")
        for v in ("mlbook + graph", "vmap + graph")
    ]
    assert "{:,.0f} MiB (mlbook) against {:,.0f} MiB".format(*mib[:2]) in text
    assert "20-way: {:,.0f} against {:,.0f} MiB".format(*mib[2:]) in text
    for w in loads:  # the bound: no more memory than the vmap step,
        # and less than before the compiled passes ("in less memory")
        peak = {v: now[w, v + " + graph"]["peak_mib"] for v in ("mlbook", "vmap")}
        assert peak["mlbook"] < peak["vmap"]
        assert peak["mlbook"] < now[w, bench.UNCOMPILED + " + graph"]["peak_mib"]
    # each of the two new levers alone, on the step before them
    tried = _record_ms("bench-h200-levers-compiled")
    pairs = [
        (tried["conv4", v + " + graph"], tried["conv4-20w", v + " + graph"])
        for v in (
            "mlbook",
            "compiled 1st-order passes",
            "one-pass stats",
            "stats and compiled passes",
            "mlbook fused Adam",
        )
    ]
    assert (
        "(`bench-h200-levers-compiled.json`, {:.2f} and {:.2f} ms), the compiled "
        "passes alone gave {:.2f} and {:.2f} ms, the one-pass statistics alone "
        "{:.2f} and {:.2f}"
    ).format(*pairs[0], *pairs[1], *pairs[2]) in text
    assert (
        "both {:.2f} and {:.2f}, and fused Adam {:.2f} and {:.2f}.".format(
            *pairs[3], *pairs[4]
        )
        in text
    )
    # the fused block and the matmul, timed when they became the defaults
    fused = _record_ms("bench-h200-fused-block")
    then = [fused[w, "mlbook + graph"] for w in loads]
    off = [fused[w, bench.UNFUSED + " + graph"] for w in loads]
    assert "(then {:.2f}, {:.2f}, {:.2f} and {:.2f} ms)".format(*then) in text
    assert said.format(bench.UNFUSED, *off) in text
    ratios = [a / b for a, b in zip(off, then)]
    assert "worth {:.2f}x, {:.2f}x, {:.2f}x and {:.2f}x (".format(*ratios) in text
    assert all(r > 1.2 for r in ratios[:3]) and ratios[3] > 0.95
    before = {
        r["workload"]: r["ms_per_step"]
        for r in bench.load_record("bench-h200")["rows"]
        if r["variant"] == "per-task loop"
    }
    loop = [before[w] for w in loads]
    assert "(per-task loop {:.1f}, {:.1f}, {:.1f} and {:.1f} ms)".format(*loop) in text
    alone = {
        (r["workload"], r["variant"]): r["ms_per_step"]
        for r in bench.load_record("bench-h200-levers-timed")["rows"]
    }
    c = {
        v: alone["conv4", v + " + graph"]
        for v in (
            "fused block",
            "conv1 matmul",
            "levers combined",
            "fused Adam",
            "mlbook",
        )
    }
    assert (
        f"every pass took the 5-way step to {c['fused block']:.2f} ms, the "
        f"matmul to {c['conv1 matmul']:.2f}, both to {c['levers combined']:.2f}"
    ) in text
    assert c["levers combined"] > then[0]  # "slower than fusing the support pass"
    fo = [alone["conv4-fo", v + " + graph"] for v in ("fused block", "mlbook")]
    assert "({:.2f} against {:.2f} ms)".format(*fo) in text and fo[0] > fo[1]
    assert f"({c['fused Adam']:.2f} against {c['mlbook']:.2f})" in text
    profile = bench.load_record("bench-h200-profile-levers")
    (off_p, on_p) = profile["profiles"]
    assert (
        f"counts {off_p['kernels_per_step']} kernels and "
        f"{off_p['kernel_ms_per_step']:.2f} ms of kernel time without the levers, "
        f"{on_p['kernels_per_step']} kernels and {on_p['kernel_ms_per_step']:.2f} ms"
    ) in text
    head = bench.load_record("bench-h200-profile-fused-block")["profiles"][0]
    kernels, ms_kernel = head["text"].split(" kernels per step, ")
    ms_kernel = ms_kernel.split(" ms of kernel time")[0]
    assert (
        f"(`bench-h200-profile-fused-block.json`) counts {kernels.split()[-1]} "
        f"kernels and {ms_kernel} ms,"
    ) in text


def test_readme_cpu_table_matches_the_records():
    workloads = {
        "sinusoid MAML": "sinusoid",
        "sinusoid first-order MAML": "sinusoid-fo",
        "sinusoid Reptile, 5 inner steps": "sinusoid-reptile",
    }
    records = {"1": "bench-cpu", "2": "bench-cpu-2threads"}
    seen = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) != 6 or cells[1] not in records:  # rows: name, threads, ms...
            continue
        label, threads, *cells = cells
        record = bench.load_record(records[threads])
        assert record["threads"] == int(threads)
        rows = {(r["workload"], r["variant"]): r["ms_per_step"] for r in record["rows"]}
        for variant, cell in zip(
            ["per-task loop", "torch.func vmap", "mlbook", "mlbook compiled"], cells
        ):
            want = rows[workloads[label], variant]
            assert float(cell) == round(want, 2), (label, threads, variant)
        seen.add((workloads[label], threads))
    assert seen == {(w, t) for w in workloads.values() for t in records}


def test_readme_op_count_table_matches_the_record():
    record = bench.load_record("bench-cpu-op-counts")
    want = {(r["workload"], r["variant"]): r for r in record["op_counts"]}
    seen = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("| conv4"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        r = want[(cells[0].split()[0], cells[1])]
        assert [int(c) for c in cells[2:]] == [
            r["ops"],
            r["compiled_calls"],
            round(r["m_elements_in"]),
        ], line
        seen.add((r["workload"], r["variant"]))
    assert seen == set(want)


def test_readme_omniglot_claim_matches_the_shipped_record():
    r = ml.zoo.info("omniglot-maml-5w1s")
    text = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(
        r"5-way 1-shot MAML, ([\d.]+) \+- ([\d.]+) % \(.*?; the paper reports "
        r"([\d.]+) \+- ([\d.]+)\) and ([\d.]+) \+- ([\d.]+) % one query image at "
        r"a time, after (\d+) s of training on the H200 \(`([^`]+)`",
        text,
    )
    assert m, "README claim not found"
    shown = [float(g) for g in m.groups()[:6]]
    recorded = [
        r["accuracy"],
        r["ci95"],
        *r["paper"],
        r["accuracy_one_query_at_a_time"],
        r["ci95_one_query_at_a_time"],
    ]
    assert shown == [round(v, 1) for v in recorded]
    assert int(m.group(7)) == round(r["train"]["wall_seconds"])
    assert r["command"].startswith(m.group(8))  # the record's, less --ship


def test_conv_impl_is_checked_and_only_conv4_gets_the_batched_forward():
    with pytest.raises(ValueError, match="conv_impl"):
        ml.MAML(ml.models.Conv4(1, 5), F.cross_entropy, 0.4, conv_impl="winograd")

    class MyConv4(ml.models.Conv4):  # a subclass may change forward: use vmap
        pass

    assert ml.MAML(ml.models.Conv4(1, 5), F.cross_entropy, 0.4)._conv_plan
    assert ml.MAML(MyConv4(1, 5), F.cross_entropy, 0.4)._conv_plan is None


def test_seconds_per_iteration_probe_on_wall_and_cpu_clocks():
    # --minutes and --cpu-minutes pick iterations from this probe
    import time

    import torch

    from mlbook import fewshot, omniglot_repro

    s = dict(omniglot_repro.settings("fomaml", 5, 1), meta_batch=1)
    images = torch.randint(
        0,
        256,
        (20, 20, 28, 28),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    train = fewshot.FewShot(images, 5)
    for clock in (time.perf_counter, time.process_time):
        per_it = omniglot_repro._seconds_per_iteration(
            s, train, torch.device("cpu"), clock=clock, short=1, long=4
        )
        assert 1e-4 < per_it < 30, clock


@pytest.mark.parametrize("method, steps", [("maml", 1), ("maml", 2), ("fomaml", 1)])
def test_torch_func_conv4_meta_gradient_equals_the_loop_in_float64(method, steps):
    # The function `--compile` hands to torch.compile, run eagerly here (the
    # benchmark checks the compiled one against the loop at run time).
    import torch

    torch.manual_seed(0)
    model = ml.models.Conv4(1, 3, hidden=4, image_size=16).double()
    x_s, x_q = (
        torch.randn(3, 3, 1, 16, 16).double(),
        torch.randn(3, 6, 1, 16, 16).double(),
    )
    y_s, y_q = (
        torch.arange(3).repeat(3, 1),
        torch.arange(3).repeat_interleave(2).repeat(3, 1),
    )
    batch = ml.TaskBatch(x_s, y_s, x_q, y_q)
    w = dict(loss=F.cross_entropy, alpha=0.3, steps=steps, method=method)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the weights
    ref_loss = bench.loop_step(w, model, batch, opt)
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss, g = bench._func_meta_grad(
        params, x_s, y_s, x_q, y_q, 0.3, steps, method == "fomaml"
    )
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for k, r in ref.items():
        # conv biases feed batch norm, which removes them: their gradient is 0
        # up to rounding, so compare against the largest gradient's scale
        scale = max(v.abs().max() for v in ref.values())
        assert (g[k] - r).abs().max() <= 1e-10 * scale, k
    assert max(r.abs().max() for k, r in ref.items() if k.endswith("1.weight")) > 1e-3


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_vmap_baseline_equals_the_loop_for_conv4_in_float64(method):
    # the torch.func vmap baseline the benchmark times for Conv4's first-order
    # MAML and Reptile (first derivatives of batch norm only)
    torch.manual_seed(0)
    x_s = torch.randn(3, 3, 1, 16, 16).double()
    x_q = torch.randn(3, 6, 1, 16, 16).double()
    y_s = torch.stack([torch.randperm(3) for _ in range(3)])
    batch = ml.TaskBatch(x_s, y_s, x_q, y_s.repeat(1, 2))
    w = dict(loss=F.cross_entropy, alpha=0.3, steps=2, method=method, outer_lr=0.5)
    results = []
    for step in (bench.loop_step, bench.vmap_step):
        torch.manual_seed(1)
        model = ml.models.Conv4(1, 3, hidden=4, image_size=16).double()
        before = [p.detach().clone() for p in model.parameters()]
        loss = step(w, model, batch, torch.optim.SGD(model.parameters(), lr=0.0))
        if method == "reptile":  # the weights' change
            update = [p.detach() - b for p, b in zip(model.parameters(), before)]
        else:  # the meta-gradient
            update = [p.grad for p in model.parameters()]
        results.append((loss.item(), torch.cat([u.flatten() for u in update])))
    (loop_loss, loop), (vmap_loss, got) = results
    assert vmap_loss == pytest.approx(loop_loss, rel=1e-12)
    assert loop.abs().max() > 1e-3
    torch.testing.assert_close(got, loop, rtol=1e-9, atol=1e-12 * loop.abs().max())


def test_readme_compiled_conv4_figures_match_their_record():
    rows = bench.load_record("bench-cpu-conv4-compiled")["rows"]
    ms = {r["variant"]: r["ms_per_step"] for r in rows}
    readme = (ROOT / "README.md").read_text()
    said = f"{ms['compiled torch.func']:.0f} against {ms['mlbook']:.0f} ms"
    assert said in readme.replace("\n", " ")
    assert ms["compiled torch.func"] > ms["mlbook"]  # "slower", as the README says


def test_readme_cpu_conv4_figures_match_their_record():
    record = bench.load_record("bench-cpu-conv4")
    ms = {(r["workload"], r["variant"]): r["ms_per_step"] for r in record["rows"]}
    rel = {
        (r["workload"], r["variant"]): r["rel_err_vs_float64"] for r in record["rows"]
    }
    readme = " ".join((ROOT / "README.md").read_text().split())

    def said(workload):  # mlbook, the loop, vmap, the NCHW step
        variants = ("mlbook", "per-task loop", "torch.func vmap", bench.NCHW)
        return ", ".join(f"{ms[workload, v]:.0f}" for v in variants)

    assert f"MAML on 8 tasks {said('conv4')}; first-order" in readme
    assert f"first-order MAML {said('conv4-fo')}; Reptile" in readme
    at_once = ms["conv4-reptile", bench.ALL_AT_ONCE]
    assert f"tasks, {said('conv4-reptile')}, and {at_once:.0f} with all" in readme
    workloads = ("conv4", "conv4-fo", "conv4-reptile")
    speedups = [ms[w, "per-task loop"] / ms[w, "mlbook"] for w in workloads]
    said_speedups = "is {:.2f}, {:.2f} and {:.2f} times".format(*speedups)
    assert said_speedups in readme
    for w in workloads:  # faster than the loop, its NCHW form and vmap
        assert ms[w, "per-task loop"] > 1.1 * ms[w, "mlbook"], w
        assert ms[w, bench.NCHW] > 1.1 * ms[w, "mlbook"], w
        assert ms[w, "torch.func vmap"] > 1.2 * ms[w, "mlbook"], w
    assert at_once > 1.2 * ms["conv4-reptile", "mlbook"]
    errors = [f"{rel['conv4-reptile', v]:.1e}" for v in ("mlbook", bench.NCHW)]
    errors = [e.replace("e-0", "e-") for e in errors]  # 1.0e-01 as 1.0e-1
    assert "({} against {} NCHW;".format(*errors) in readme
