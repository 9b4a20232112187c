"""``bench/RESULTS.md`` from the benchmark CSV.

    python -m bench.report [--csv bench/results/results.csv] [--out bench/RESULTS.md]

Every figure in the page comes from the CSV; nothing is typed in by hand. Devices
without rows are said to be not yet measured, never estimated.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path

from .harness import REPO

DEFAULT_CSV = REPO / "bench" / "results" / "results.csv"
DEFAULT_OUT = REPO / "bench" / "RESULTS.md"


def _f(r: dict, k: str) -> float:
    try:
        v = float(r.get(k) or "nan")
    except ValueError:
        return math.nan
    return v


def _t(x: float) -> str:
    if math.isnan(x):
        return "–"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def _g(x: float, digits: int = 4) -> str:
    return "–" if math.isnan(x) else f"{x:.{digits}g}"


def _speedup(ratio: float) -> str:
    """The cdfast/reference time ratio, with 'N× faster' / 'N× slower'."""
    if math.isnan(ratio) or ratio <= 0:
        return "–"
    word = f"{1 / ratio:.1f}× faster" if ratio <= 1 else f"{ratio:.1f}× slower"
    return f"{ratio:.3g} ({word})"


def _n(x: float) -> str:
    """A rate or count: 3 significant digits, no exponent."""
    if math.isnan(x):
        return "–"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _mib(x: float) -> str:
    return "–" if math.isnan(x) else f"{x / 2 ** 20:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _load(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _case_sort(r: dict):
    return (r["kind"], r["layer"], int(float(r["n"] or 0)), int(float(r["steps"] or 0)), r["impl"])


def _device_section(rows: list[dict], dev: str, results_dir: Path, md_dir: Path) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    first = rows[0]
    loads = [_f(r, "loadavg_1m") for r in rows if not math.isnan(_f(r, "loadavg_1m"))]
    runs = sorted({r["run_id"] for r in rows})
    modes = sorted({r["mode"] for r in rows})
    L: list[str] = []
    L.append(f"## {dev.upper()}: {first['device_name']}\n")
    L.append(_table(["", ""], [
        ["device", f"{first['device_name']} ({dev})"],
        ["CPU", f"{first['cpu_model']}, {first['cpu_cores']} cores available, "
                f"torch threads {first['torch_threads']}"],
        ["software", f"torch {first['torch_version']}, cdfast {first['cdfast_version']}, git {first['git']}"],
        ["measured peaks (this run, best of start and end)",
         f"{_f(first, 'peak_flops_per_s') / 1e9:.1f} GFLOP/s fp32 matmul, "
         f"{_f(first, 'peak_bytes_per_s') / 1e9:.1f} GB/s copy"],
        ["runs", ", ".join(runs) + f" ({', '.join(modes)})"],
        ["1-min load average during the rows",
         (f"{min(loads):.1f} – {max(loads):.1f} (on {first['cpu_cores']} cores)" if loads else "–")],
    ]))
    L.append("")

    # ---------------------------------------------------------------- headline
    head = [r for r in ok if r["kind"] == "headline"]
    if head:
        h = {r["impl"]: r for r in head}
        c = h.get("cdfast")
        e = h.get("reference_eager")
        r0 = head[0]
        L.append("### Headline: one layer, cdfast against the authors' procedure\n")
        L.append(f"Conv2d {r0['c_in']}→{r0['c_out']} {r0['kernel']}×{r0['kernel']} pad 1, "
                 f"{r0['n']} samples of {r0['hw']}×{r0['hw']}, h_student = h_teacher + 0.1·N(0,1), "
                 f"loss=\"cross\", μ={r0['mu']}, ChannelPrune(keep={r0['keep']}), Adam, "
                 f"{r0['steps']} steps, lr={r0['lr']}.\n")
        trs = []
        for impl in ("cdfast", "cdfast_statistics", "cdfast_solver", "reference_eager", "reference_compile"):
            r = h.get(impl)
            if not r:
                continue
            meas = r["measured_steps"] if r["impl"] != "cdfast_statistics" else "–"
            trs.append([impl, meas + (" (time extrapolated)" if r["extrapolated"] == "1" else ""),
                        _t(_f(r, "median_s")), r["repeats"], _g(_f(r, "final_loss"), 6),
                        _speedup(_f(r, "ratio_time_vs_eager")), _mib(_f(r, "peak_mem_bytes")), r["backend"]])
        L.append(_table(["implementation", "steps measured", "median time", "repeats", "final loss",
                         "vs eager reference", "peak mem (MiB)", "backend"], trs))
        if c and e:
            L.append("")
            L.append(f"**cdfast {_t(_f(c, 'median_s'))} vs eager reference {_t(_f(e, 'median_s'))}"
                     f"{' (extrapolated)' if e['extrapolated'] == '1' else ''}: ratio "
                     f"{_speedup(_f(c, 'ratio_time_vs_eager'))}; "
                     f"final loss {_g(_f(c, 'final_loss'), 6)} (cdfast) vs {_g(_f(e, 'final_loss'), 6)} "
                     f"(reference).**")
        L.append("")

    # ----------------------------------------------------------- single layers
    layer = [r for r in ok if r["kind"] == "layer"]
    if layer:
        L.append("### Single layers: full `distill_layer` against the reference\n")
        L.append("Channel pruning to half the input channels with the cross loss; CIFAR ResNet-56 "
                 "layers use μ=0.9, lr=1e-3, ImageNet-style layers μ=0.6, lr=5e-4. Both "
                 "implementations run the same number of Adam steps (reduced on CPU). "
                 "'vs' columns: cdfast's time against the reference's, measured in the same run.\n")
        trs = []
        cases = sorted({(r["layer"], int(r["n"]), int(r["steps"]), r["case"], int(r["c_in"])) for r in layer
                        if r["impl"] == "cdfast"}, key=lambda k: (k[0].startswith("imagenet"), k[4], k[1]))
        for lay, n, steps, case, _ in cases:
            rs = {r["impl"]: r for r in layer if r["case"] == case}
            c = rs["cdfast"]
            trs.append([lay, n, steps, _t(_f(c, "median_s")),
                        _t(_f(rs.get("reference_eager", {}), "median_s")),
                        _t(_f(rs.get("reference_compile", {}), "median_s")),
                        _speedup(_f(c, "ratio_time_vs_eager")), _speedup(_f(c, "ratio_time_vs_compile")),
                        _g(_f(c, "final_loss"), 6), _g(_f(rs.get("reference_eager", {}), "final_loss"), 6),
                        _g(_f(c, "loss_rel_vs_eager") * 100, 2) + " %"
                        if not math.isnan(_f(c, "loss_rel_vs_eager")) else "–"])
        L.append(_table(["layer", "N", "steps", "cdfast", "ref eager", "ref compile", "vs eager",
                         "vs compile", "cdfast loss", "ref loss", "loss Δ"], trs))
        L.append("")

    # ---------------------------------------------------------------- the parts
    parts = [r for r in ok if r["kind"] in ("layer", "headline") and r["impl"].startswith("cdfast")]
    if parts:
        L.append("### Where the time goes: statistics pass, solver steps, and the floor\n")
        L.append("`floor` = max(counted FLOPs / peak FLOP/s, counted bytes / peak bytes/s), peaks "
                 "measured in the same run; '% of floor' = floor / measured time (100 % would run at "
                 "the measured matmul or copy peak; oneDNN convolutions can slightly exceed the "
                 "matmul figure). Reference rows use the reference's own counted work (four "
                 "convolutions and two weight gradients per step). 'time / eager ref' divides by the "
                 "full reference time of the same layer, also for the statistics-only and "
                 "solver-only rows (which are parts of cdfast's full call).\n")
        trs = []
        allrows = [r for r in ok if r["kind"] in ("layer", "headline")]
        for r in sorted(allrows, key=lambda r: (r["kind"] != "headline", r["layer"].startswith("imagenet"),
                                                 int(r["c_in"]), int(r["n"]), r["impl"])):
            thr = (f"{_n(_f(r, 'samples_per_s'))} samples/s" if r["impl"] == "cdfast_statistics"
                   else f"{_n(_f(r, 'steps_per_s'))} steps/s")
            trs.append([r["layer"], r["n"], r["impl"], _t(_f(r, "median_s")), thr,
                        _n(_f(r, "flops") / 1e9), _n(_f(r, "achieved_flops_per_s") / 1e9),
                        _n(_f(r, "achieved_bytes_per_s") / 1e9),
                        f"{_f(r, 'floor_fraction') * 100:.0f}" if not math.isnan(_f(r, "floor_fraction")) else "–",
                        _mib(_f(r, "peak_mem_bytes")), _g(_f(r, "ratio_time_vs_eager"), 3)])
        L.append(_table(["layer", "N", "implementation", "median", "throughput", "GFLOP counted",
                         "GFLOP/s", "GB/s", "% of floor", "peak MiB", "time / eager ref"], trs))
        L.append("")

    # ------------------------------------------------------------------ scaling
    for kind, xcol, title in (("scale_N", "n", "Time against the number of samples N"),
                              ("scale_D", "d", "Time against D = C_in·k²")):
        sel = [r for r in ok if r["kind"] == kind]
        if not sel:
            continue
        L.append(f"### {title}\n")
        r0 = sel[0]
        fixed = ("32→32 3×3 at 16 px" if kind == "scale_N" else f"C_in→64 3×3, N={r0['n']} at {r0['hw']} px")
        L.append(f"{fixed}, {r0['steps']} Adam steps for every implementation, keep 0.5.\n")
        xs = sorted({int(float(r[xcol])) for r in sel})
        impls = [i for i in ("reference_eager", "cdfast", "cdfast_statistics", "cdfast_solver")
                 if any(r["impl"] == i for r in sel)]
        trs = []
        for x in xs:
            row = [x]
            for i in impls:
                m = [r for r in sel if r["impl"] == i and int(float(r[xcol])) == x]
                row.append(_t(_f(m[0], "median_s")) if m else "–")
            c = [r for r in sel if r["impl"] == "cdfast" and int(float(r[xcol])) == x]
            row.append(_speedup(_f(c[0], "ratio_time_vs_eager")) if c else "–")
            trs.append(row)
        L.append(_table([xcol.upper() if xcol == "d" else "N"] + impls + ["cdfast vs eager"], trs))
        png = results_dir / f"scaling_{kind[-1]}_{dev}.png"
        if png.exists():
            L.append("")
            L.append(f"![{title}]({Path(os.path.relpath(png, md_dir)).as_posix()})")
        L.append("")

    # ------------------------------------------------------------------- models
    models = [r for r in rows if r["kind"] == "model"]
    if models:
        L.append("### Whole models: `cdfast.compress`\n")
        trs = []
        for r in models:
            trs.append([r["layer"], r["n"], r["steps"], r["status"], _t(_f(r, "median_s")),
                        _mib(_f(r, "peak_mem_bytes")), _g(_f(r, "final_loss"), 4), r["note"]])
        L.append(_table(["model", "N", "steps/layer", "status", "time", "peak MiB", "final loss", "note"], trs))
        L.append("")

    bad = [r for r in rows if r["status"] not in ("ok", "not available")]
    if bad:
        L.append("### Rows that failed\n")
        L.append(_table(["case", "implementation", "status"], [[r["case"], r["impl"], r["status"]] for r in bad]))
        L.append("")
    return L


TASK_TITLES = {"W2": "W2 (per-channel grid)", "W4": "W4 (per-channel grid)", "50%": "50 % unstructured",
               "2:4": "2:4", "channel": "half the input channels"}
PEER_NAMES = {"gptq": "GPTQ", "gptq_act": "GPTQ act-order", "gptq_clip": "GPTQ + clipping search",
              "gptq_clip_act": "GPTQ + clipping search + act-order", "sparsegpt": "SparseGPT",
              "gptq_pass": "one GPTQ pass (W4)", "cdfast": "cdfast exact", "cdfast_adam": "cdfast Adam (3000 steps)"}


def _posttraining_section(path: Path) -> list[str]:
    """The exact solver against GPTQ and SparseGPT (``bench/results/posttraining.csv``)."""
    if not Path(path).exists():
        return []
    rows = [r for r in _load(path) if r["status"] == "ok"]
    if not rows:
        return []
    first = rows[0]
    runs = sorted({r["run_id"] for r in rows})
    loads = [_f(r, "loadavg_1m") for r in rows if not math.isnan(_f(r, "loadavg_1m"))]
    L = ["## The exact solver against GPTQ and SparseGPT", "",
         f"`python -m bench.posttraining` ({first['cpu_model']}, torch {first['torch_version']}, "
         f"{first['torch_threads']} torch thread(s), git {first['git']}, runs {', '.join(runs)}, "
         + (f"1-min load average {min(loads):.1f}–{max(loads):.1f}" if loads else "") + "). "
         "Bias-free layers, teacher weights with Laplace entries; inputs from a fixed random feature model "
         "(a decaying spectrum, outlier channels; post-ReLU maps for the convolutions), the held-out rows drawn "
         "the same way as the calibration rows, and the student's inputs equal to the teacher's, so that every "
         "loss of cdfast's family is the reconstruction GPTQ and SparseGPT minimise. Error: relative, "
         "‖(W − W₀)X‖²/‖W₀X‖², float64. Time: wall clock including the statistics (the peers build H = XXᵀ "
         "from the same inputs), median of the repeats, taken round-robin over the implementations of a "
         "case. GPTQ and SparseGPT are written from the papers in `bench/peers.py`. The ratios divide cdfast "
         "by the peer measured in the same run: for quantization GPTQ with its clipping search (the faster "
         "of its act-order and plain variants for time, the more accurate for error).", ""]
    by = {}
    for r in rows:
        by.setdefault((r["case"], r["task"]), {})[r["impl"]] = r
    order = []
    for r in rows:
        if r["case"] not in order:
            order.append(r["case"])
    head = ["layer", "rows × cols", "task", "peer", "peer time", "cdfast time", "time ratio",
            "peer held-out", "cdfast held-out", "error ratio", "peer calib", "cdfast calib"]
    body = []
    for task in ("W2", "W4", "50%", "2:4"):
        for case in order:
            impls = by.get((case, task))
            if not impls or "cdfast" not in impls:
                continue
            c = impls["cdfast"]
            peer_t = c["peer"].split(" (time)")[0]
            peer_e = c["peer"].split(", ")[-1].split(" (error)")[0]
            body.append([case, f"{c['rows']} × {c['cols']}", TASK_TITLES[task], PEER_NAMES.get(peer_e, peer_e),
                         _t(_f(impls[peer_t], "median_s")), _t(_f(c, "median_s")),
                         _speedup(_f(c, "ratio_time_vs_peer")),
                         _g(_f(impls[peer_e], "heldout_err")), _g(_f(c, "heldout_err")),
                         _g(_f(c, "ratio_heldout_vs_peer"), 3),
                         _g(_f(impls[peer_e], "calib_err")), _g(_f(c, "calib_err"))])
    if body:
        L += ["### Time and held-out error against the peer", "", _table(head, body), ""]
        worst_t = max(_f(by[(b[0], t)]["cdfast"], "ratio_time_vs_peer")
                      for b in body for t in TASK_TITLES if TASK_TITLES[t] == b[2])
        worst_e = max(_f(by[(b[0], t)]["cdfast"], "ratio_heldout_vs_peer")
                      for b in body for t in TASK_TITLES if TASK_TITLES[t] == b[2])
        L += [f"**Largest time ratio {worst_t:.3g}, largest held-out error ratio {worst_e:.3g}** "
              "over the rows above (≤ 1 means cdfast is at least as fast and at least as accurate).", ""]
    q = []
    for case in order:
        for task in ("W2", "W4"):
            impls = by.get((case, task), {})
            for impl in ("gptq", "gptq_act", "gptq_clip", "gptq_clip_act", "cdfast"):
                r = impls.get(impl)
                if r:
                    q.append([case, task, PEER_NAMES[impl], _t(_f(r, "median_s")), _g(_f(r, "calib_err")),
                              _g(_f(r, "heldout_err"))])
    if q:
        L += ["### Every GPTQ variant", "", _table(["layer", "task", "implementation", "time", "calib error",
                                                    "held-out error"], q), ""]
    ch = []
    for case in order:
        impls = by.get((case, "channel"), {})
        if "cdfast" in impls and "gptq_pass" in impls:
            c = impls["cdfast"]
            ch.append([case, f"{c['rows']} × {c['cols']}", _t(_f(impls["gptq_pass"], "median_s")),
                       _t(_f(c, "median_s")), f"{_f(c, 'ratio_time_vs_peer'):.3g}×", _g(_f(c, "heldout_err"))])
    if ch:
        L += ["### Channel pruning at scale: the greedy selection against one GPTQ pass", "",
              "`ChannelPrune(0.5)`, `solver=\"exact\"` (the greedy group selection in rounds of joint removals, "
              "then one solve on the kept channels), statistics included in both.", "",
              _table(["layer", "rows × cols", "one GPTQ pass", "cdfast channel pruning", "factor",
                      "cdfast held-out error"], ch), ""]
    ad = []
    for (case, task), impls in by.items():
        if "cdfast_adam" in impls and "cdfast" in impls:
            a, c = impls["cdfast_adam"], impls["cdfast"]
            ad.append([case, TASK_TITLES[task], _t(_f(a, "median_s")), _t(_f(c, "median_s")),
                       _g(_f(a, "heldout_err")), _g(_f(c, "heldout_err")), _g(_f(a, "calib_err")),
                       _g(_f(c, "calib_err"))])
    if ad:
        L += ["### The exact solver against cdfast's Adam (for `solver=\"auto\"`)", "",
              _table(["layer", "task", "Adam time", "exact time", "Adam held-out", "exact held-out",
                      "Adam calib", "exact calib"], ad), ""]
    return L


def _memory_section(path: Path) -> list[str]:
    """Peak memory of wide layers (``bench/results/memory.csv``, ``python -m bench.memory``)."""
    if not Path(path).exists():
        return []
    rows = _load(path)
    L = ["## Wide layers: memory", "",
         "`python -m bench.memory`: one `distill_layer` call per row in a fresh process; peak resident set "
         "(`ru_maxrss`) of the whole process, and its growth over the process before the call (inputs and "
         "layer already allocated). The Gram column is what the three D × D float32 statistics alone would "
         "take; the losses are the layer's (cross) loss of the naive compression and of the result.", "",
         _table(["layer", "samples", "compression", "solver", "form", "status", "time", "peak RSS (MiB)",
                 "growth (MiB)", "three Grams would take (MiB)", "loss before", "loss after"],
                [[r["layer"], r["samples"], r["compression"], r["solver"], r["form"], r["status"],
                  _t(_f(r, "seconds")), _mib(_f(r, "peak_rss_bytes")), _mib(_f(r, "growth_bytes")),
                  _mib(_f(r, "gram_bytes")), _g(_f(r, "loss_before")), _g(_f(r, "loss_after"))]
                 for r in rows]), ""]
    return L


def render(csv_path: Path = DEFAULT_CSV, out: Path = DEFAULT_OUT) -> str:
    rows = _load(csv_path)
    results_dir = Path(csv_path).resolve().parent
    md_dir = Path(out).resolve().parent
    L = ["# cdfast benchmark results", "",
         f"Generated by `python -m bench.report` from `{_rel(csv_path)}`; do not edit by hand "
         "(the commands that regenerate it are at the end).", ""]
    devices = sorted({r["device"] for r in rows})
    if "cuda" not in devices:
        L += ["**GPU figures are not yet measured** (no GPU was available in the session that "
              "produced these results). No GPU figure on this page is estimated.", ""]
    cpu_rows = [r for r in rows if r["device"] == "cpu"]
    threads_flag = ""
    if cpu_rows:
        first = cpu_rows[0]
        L += [f"CPU figures come from this machine: {first['cpu_model']}, {first['cpu_cores']} cores, "
              f"torch {first['torch_version']}.", ""]
        threads = {r["torch_threads"] for r in cpu_rows}
        if threads and all(t and int(t) < int(first["cpu_cores"]) for t in threads):
            threads_flag = f" --threads {min(int(t) for t in threads)}"
            L += [f"They were taken with {', '.join(sorted(threads))} torch thread(s) (`--threads`), not "
                  f"{first['cpu_cores']}: the machine was shared with other jobs (see the load average "
                  "below), and under that load two OpenMP threads stalled each other, with the same "
                  "call varying by more than an order of magnitude between repeats in trial runs, "
                  "while one thread repeated within a few per cent. Both cdfast and the reference ran "
                  "under the same setting, so the ratios compare like with like.", ""]
    for dev in devices:
        L += _device_section([r for r in rows if r["device"] == dev], dev, results_dir, md_dir)
    L += _posttraining_section(results_dir / "posttraining.csv")
    L += _memory_section(results_dir / "memory.csv")
    L += ["## How the figures are made", "",
          "* **Time**: wall clock of one call, median over the timed repeats after a first "
          "(warm-up) call; when one call exceeds the repeat budget the first call is the "
          "measurement (noted in the CSV). `torch.compile`'s compilation is excluded "
          "(its first call is recorded separately in `first_call_s`).",
          "* **Reference**: `tests/authors_reference.py::authors_channel_prune` (four convolutions "
          "per step, `torch.optim.Adam`, top-k channel schedule), eager and with "
          "`compile_step=True`. `--reference-steps K` times it on K steps and extrapolates "
          "linearly; such rows say `extrapolated=1`, and their losses are not compared.",
          "* **Final loss**: every implementation's final weight is scored by the same float64 "
          "data-form evaluation of the cross loss (`bench.cases.eval_cross_loss`); each "
          "implementation's own figure is kept in `reported_loss`. `loss_not_worse_than_eager` "
          "allows a relative excess of 1e-3 (float32 round-off).",
          "* **Counted work** (`bench.harness.layer_work`): reference 12·M·C_out·D FLOP per step; "
          "statistics 4·M·D² FLOP; solver 2·C_out·d² FLOP per step (d = D during the channel "
          "ramp, keep·D after), M = N·H·W, D = C_in·k². Bytes: inputs/outputs read or written "
          "once per operation. Achieved rates divide these by the measured time.",
          "* **Peaks**: measured in the same run, at its start and again at its end (the better "
          "figure is kept: a shared machine can depress one of them), each the best of several "
          "large fp32 matmuls (FLOP/s) and large copies (bytes/s, read + write).",
          "* **Peak memory**: CPU: peak resident-set growth during the call, sampled every 2 ms "
          "after returning free pages to the OS (tracemalloc cannot see tensor storage); "
          "GPU: `torch.cuda.max_memory_allocated` growth.",
          "* **Sizes**: CPU cases are scaled down from the GPU grid (fewer samples, fewer steps "
          "except the headline, which runs the full 3000); see `bench/cases.py::GRID`.",
          "",
          "## Regenerate", "",
          "```bash",
          f"python -m bench.run --device cpu{threads_flag} --out bench/results   # full CPU run (about 20 min here)",
          "python -m bench.run --device cuda --out bench/results    # GPU rows, same CSV",
          "python -m bench.posttraining --threads 1                 # exact solver vs GPTQ/SparseGPT (about 40 min)",
          "python -m bench.memory                                   # wide layers: peak memory",
          "python -m bench.report                                   # this page",
          "python -m bench.run --quick                              # CI smoke run (bench/results/quick)",
          "python -m pytest bench --benchmark-enable                # pytest-benchmark view",
          "```", ""]
    text = "\n".join(L)
    Path(out).write_text(text)
    return text


def _rel(p) -> str:
    try:
        return Path(p).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(p)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    render(Path(a.csv), Path(a.out))
    print(a.out)


if __name__ == "__main__":
    main()
