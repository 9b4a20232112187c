"""Run every benchmark case and write one CSV (plus the scaling plots).

    python -m bench.run                       # full run on the default device
    python -m bench.run --quick               # every case once at its smallest size (CI)
    python -m bench.run --device cuda --out bench/results
    python -m bench.run --reference-steps 300 # reference timed on 300 steps, extrapolated

One row per (case, implementation, device) in ``<out>/results.csv``; rows of other
devices already in that file are kept, rows of this device are replaced. Every
cdfast row carries its ratio to the reference rows of the same case measured in the
same run (time and peak memory), and both final losses, evaluated the same way
(:func:`bench.cases.eval_cross_loss`).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import cases as C
from . import harness as H

COLUMNS = [
    "run_id", "mode", "kind", "case", "impl", "device", "device_name", "status",
    "layer", "c_in", "c_out", "kernel", "hw", "n", "d", "m", "keep", "mu", "lr",
    "steps", "measured_steps", "extrapolated",
    "repeats", "median_s", "min_s", "first_call_s", "steps_per_s", "samples_per_s",
    "flops", "bytes", "achieved_flops_per_s", "achieved_bytes_per_s",
    "peak_flops_per_s", "peak_bytes_per_s", "floor_s", "floor_fraction",
    "peak_mem_bytes", "mem_method", "final_loss", "reported_loss", "backend",
    "ref_eager_s", "ref_eager_loss", "ref_eager_extrapolated", "ratio_time_vs_eager",
    "ratio_mem_vs_eager", "loss_rel_vs_eager", "loss_not_worse_than_eager",
    "ref_compile_s", "ref_compile_loss", "ratio_time_vs_compile", "ratio_mem_vs_compile",
    "loss_rel_vs_compile",
    "cpu_model", "cpu_cores", "torch_threads", "torch_version", "cdfast_version", "git",
    "loadavg_1m", "timestamp", "note",
]

#: "Equal or lower" final loss: relative excess up to this is float round-off.
LOSS_TOL = 1e-3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Runner:
    def __init__(self, device: torch.device, quick: bool, reference_steps: int | None,
                 max_repeats: int, budget_s: float):
        self.device = device
        self.quick = quick
        self.reference_steps = reference_steps
        self.max_repeats = max_repeats
        self.budget_s = budget_s
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.common = {
            "run_id": self.run_id, "mode": "quick" if quick else "full", "device": device.type,
            "device_name": H.device_name(device), "cpu_model": H.cpu_model(),
            "cpu_cores": H.cpu_cores(), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "cdfast_version": getattr(C.cdfast, "__version__", ""),
            "git": H.git_state(),
        }
        _log(f"[bench] measuring peak rates on {self.common['device_name']} ...")
        self.peaks = H.measure_peaks(device, quick)
        _log(f"[bench] peak {self.peaks['peak_flops_per_s'] / 1e9:.1f} GFLOP/s (fp32 matmul "
             f"{self.peaks['matmul_n']}), {self.peaks['peak_bytes_per_s'] / 1e9:.1f} GB/s (copy)")
        self.rows: list[dict] = []

    # ------------------------------------------------------------------ helpers
    def _row(self, **kw) -> dict:
        row = dict.fromkeys(COLUMNS)
        row.update(self.common)
        row["peak_flops_per_s"] = self.peaks["peak_flops_per_s"]
        row["peak_bytes_per_s"] = self.peaks["peak_bytes_per_s"]
        row["loadavg_1m"] = H.loadavg()
        row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row.update(kw)
        return row

    def warm_up(self) -> None:
        """Untimed: thread pools, oneDNN/cuBLAS handles, cdfast dispatch."""
        case = C.LayerCase("warmup", "warmup", H.LayerShape(8, 8, 3, 8, 2), 6, 1e-3, 0.9)
        prep = C.prepare(case, self.device)
        for impl in ("cdfast", "cdfast_statistics", "cdfast_solver", "reference_eager"):
            C.make_fn(prep, impl)()
        H.sync(self.device)

    # --------------------------------------------------------------- layer cases
    def run_layer_case(self, case: C.LayerCase) -> None:
        s = case.shape
        prep = C.prepare(case, self.device)
        for impl in case.impls:
            base = dict(kind=case.kind, case=case.name, impl=impl, layer=case.layer, c_in=s.c_in,
                        c_out=s.c_out, kernel=s.k, hw=s.hw, n=s.n, d=s.d, m=s.m, keep=case.keep,
                        mu=case.mu, lr=case.lr, steps=case.steps if impl != "cdfast_statistics" else 0)
            steps_run = case.steps
            extrapolated = False
            if (impl in C.REFERENCE_IMPLS and self.reference_steps
                    and self.reference_steps < case.steps):
                steps_run, extrapolated = self.reference_steps, True
            note = []
            try:
                if impl == "cdfast_solver":
                    prep.statistics()  # untimed: this row times the solve alone
                if impl == "reference_compile":
                    torch._dynamo.reset()
                fn = C.make_fn(prep, impl, steps_run)
                meas = H.measure(fn, self.device, max_repeats=self.max_repeats, budget_s=self.budget_s,
                                 warmup_is_compile=impl == "reference_compile")
                weight, info = meas.output
                t = meas.median_s * (case.steps / steps_run if extrapolated else 1.0)
                tmin = meas.min_s * (case.steps / steps_run if extrapolated else 1.0)
                flops, nbytes = H.layer_work(s, impl, case.steps, case.keep)
                final = C.eval_cross_loss(prep, weight) if weight is not None else None
                if meas.single:
                    note.append("one call timed (includes warm-up)")
                if impl == "reference_compile":
                    note.append(f"compile+first call {meas.first_call_s:.3g}s excluded")
                if extrapolated:
                    note.append(f"time extrapolated linearly from {steps_run} measured steps; "
                                f"final_loss is after {steps_run} steps")
                row = self._row(**base, status="ok", measured_steps=steps_run if impl != "cdfast_statistics" else 0,
                                extrapolated=extrapolated, repeats=len(meas.times), median_s=t, min_s=tmin,
                                first_call_s=meas.first_call_s,
                                steps_per_s=(case.steps / t) if impl != "cdfast_statistics" else None,
                                samples_per_s=s.n / t, flops=flops, bytes=nbytes,
                                achieved_flops_per_s=flops / t, achieved_bytes_per_s=nbytes / t,
                                peak_mem_bytes=meas.peak_mem_bytes, mem_method=meas.mem_method,
                                final_loss=final, reported_loss=info.get("reported_loss"),
                                backend=info.get("backend"), note="; ".join(note))
            except Exception as exc:  # a failing implementation is a row, not a crash
                traceback.print_exc(file=sys.stderr)
                row = self._row(**base, status=f"error: {type(exc).__name__}: {exc}"[:300],
                                measured_steps=steps_run, extrapolated=extrapolated)
            self.rows.append(row)
            self._print(row)

    def _print(self, row: dict) -> None:
        if row["status"] != "ok":
            _log(f"  {row['case']:<58} {row['impl']:<18} {row['status']}")
            return
        loss = f"{row['final_loss']:.6g}" if row["final_loss"] is not None else "-"
        _log(f"  {row['case']:<58} {row['impl']:<18} {row['median_s']:9.4f}s  loss {loss}  "
             f"mem {row['peak_mem_bytes'] / 2**20:7.1f} MiB  [{row['backend']}]"
             + (" (extrapolated)" if row["extrapolated"] else ""))

    # --------------------------------------------------------------- model cases
    def run_model_case(self, mc: C.ModelCase) -> None:
        base = dict(kind=mc.kind, case=mc.name, impl="cdfast", layer=mc.model, n=mc.n, hw=mc.hw,
                    keep=mc.keep, mu=mc.mu, lr=mc.lr, steps=mc.steps)
        compress = getattr(C.cdfast, "compress", None)
        if compress is None:
            row = self._row(**base, status="not available",
                            note="cdfast.compress is not in this build; nothing was timed")
            self.rows.append(row)
            self._print(row)
            return
        try:
            from cdfast.experiments import models

            torch.manual_seed(0)
            if mc.model.startswith("resnet"):
                teacher = models.resnet(int(mc.model[6:]), in_channels=3, num_classes=10)
            else:
                teacher = models.vgg(mc.model, in_channels=3, num_classes=10)
            teacher = teacher.to(self.device).eval()
            g = torch.Generator(device=self.device).manual_seed(1)
            x = torch.randn(mc.n, 3, mc.hw, mc.hw, device=self.device, generator=g)
            params = inspect.signature(compress).parameters
            kw = dict(compression=C.cdfast.ChannelPrune(mc.keep), loss="cross", mu=mc.mu, steps=mc.steps)
            optional = {"lr": mc.lr, "progress": False, "verbose": False}
            if mc.model.startswith("resnet"):
                optional["policy"] = "resnet"  # prune only block-internal channels (SPEC §4)
            kw.update({k: v for k, v in optional.items() if k in params})

            def fn():
                return compress(teacher, x, **kw)

            meas = H.measure(fn, self.device, max_repeats=min(2, self.max_repeats), budget_s=self.budget_s)
            out = meas.output
            student = _find_module(out)
            report = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            note = ["untrained (random-init) teacher, synthetic N(0,1) inputs: a timing case"]
            if "policy" in kw:
                note.append(f"policy={kw['policy']}")
            final = None
            if student is not None:
                with torch.no_grad():
                    student.eval()
                    final = float((student(x) - teacher(x)).pow(2).mean())
                note.append("final_loss = MSE of the student's logits against the teacher's")
            if report is not None and getattr(report, "params_before", None):
                note.append(f"parameters {report.params_before} -> {report.params_after}")
            if report is not None and getattr(report, "flops_before", None):
                note.append(f"FLOPs/sample {report.flops_before} -> {report.flops_after}")
            if meas.single:
                note.append("one call timed (includes warm-up)")
            t = meas.median_s
            row = self._row(**base, status="ok", measured_steps=mc.steps, extrapolated=False,
                            repeats=len(meas.times), median_s=t, min_s=meas.min_s,
                            first_call_s=meas.first_call_s, samples_per_s=mc.n / t,
                            peak_mem_bytes=meas.peak_mem_bytes, mem_method=meas.mem_method,
                            final_loss=final, backend=_model_backend(report), note="; ".join(note))
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            row = self._row(**base, status=f"error: {type(exc).__name__}: {exc}"[:300])
        self.rows.append(row)
        self._print(row)

    # ------------------------------------------------------------------- floors
    def add_floors(self) -> None:
        """Measure the peaks again at the end and keep the better of the two figures
        (a shared machine can depress one measurement), then set every row's floor."""
        again = H.measure_peaks(self.device, self.quick)
        for k in ("peak_flops_per_s", "peak_bytes_per_s"):
            self.peaks[k] = max(self.peaks[k], again[k])
        _log(f"[bench] peak (best of start and end) {self.peaks['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, "
             f"{self.peaks['peak_bytes_per_s'] / 1e9:.1f} GB/s")
        for r in self.rows:
            r["peak_flops_per_s"] = self.peaks["peak_flops_per_s"]
            r["peak_bytes_per_s"] = self.peaks["peak_bytes_per_s"]
            if r["status"] == "ok" and r.get("flops"):
                floor = max(r["flops"] / self.peaks["peak_flops_per_s"], r["bytes"] / self.peaks["peak_bytes_per_s"])
                r["floor_s"], r["floor_fraction"] = floor, floor / r["median_s"]

    # ------------------------------------------------------------------- ratios
    def add_ratios(self) -> None:
        by_case: dict[str, dict[str, dict]] = {}
        for r in self.rows:
            by_case.setdefault(r["case"], {})[r["impl"]] = r
        for impls in by_case.values():
            refs = {}
            for tag in ("eager", "compile"):
                ref = impls.get(f"reference_{tag}")
                if ref and ref["status"] == "ok":
                    refs[tag] = ref
            for impl, r in impls.items():
                if not impl.startswith("cdfast") or r["status"] != "ok":
                    continue
                for tag, ref in refs.items():
                    r[f"ref_{tag}_s"] = ref["median_s"]
                    r[f"ref_{tag}_loss"] = ref["final_loss"]
                    r[f"ratio_time_vs_{tag}"] = r["median_s"] / ref["median_s"]
                    if ref["peak_mem_bytes"]:
                        r[f"ratio_mem_vs_{tag}"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]
                    if r["final_loss"] is not None and ref["final_loss"] and not ref["extrapolated"]:
                        rel = (r["final_loss"] - ref["final_loss"]) / ref["final_loss"]
                        r[f"loss_rel_vs_{tag}"] = rel
                        if tag == "eager":  # the reference the loss target is stated against
                            r["loss_not_worse_than_eager"] = rel <= LOSS_TOL
                if "eager" in refs:
                    r["ref_eager_extrapolated"] = refs["eager"]["extrapolated"]


def _model_backend(report) -> str:
    layers = getattr(report, "layers", None) or []
    names = sorted({getattr(l, "backend", "") for l in layers} - {""})
    return "+".join(names) if names else "auto"


def _find_module(out):
    if isinstance(out, torch.nn.Module):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.nn.Module):
                return o
    for name in ("model", "student", "module"):
        m = getattr(out, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def _key(r: dict) -> tuple:
    return (str(r.get("case")), str(r.get("impl")), str(r.get("device")), str(r.get("device_name")))


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows already in ``path`` for the same (case, impl, device, device name) are
    replaced, all others kept, so runs of other devices (or of ``--only``) accumulate."""
    H.merge_csv(rows, path, COLUMNS, _key)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="every case once at its smallest size (CI; < 2 min on CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None,
                   help="output folder (default bench/results, bench/results/quick with --quick)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="run the reference for at most this many steps and extrapolate its time "
                        "linearly (rows are marked extrapolated; losses are then not compared)")
    p.add_argument("--only", default=None, help="run only cases whose name contains this text")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's own choice)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats at most (default 5, quick 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repeats per row beyond the first call (default 20, quick 1)")
    args = p.parse_args(argv)
    if args.reference_steps is not None and args.reference_steps < 1:
        p.error("--reference-steps: expected a positive integer")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    device = torch.device(dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = H.loadavg()
    if dev == "cpu" and load is not None and load > H.cpu_cores() and torch.get_num_threads() > 1:
        _log(f"[bench] warning: load average {load:.1f} on {H.cpu_cores()} cores: other work is running; "
             f"CPU times will be noisy (consider --threads 1)")
    out = Path(args.out) if args.out else (H.REPO / "bench" / "results" / ("quick" if args.quick else ""))
    start = time.perf_counter()
    runner = Runner(device, args.quick, args.reference_steps,
                    max_repeats=args.repeats or (1 if args.quick else 5),
                    budget_s=args.budget if args.budget is not None else (1.0 if args.quick else 20.0))
    runner.warm_up()
    layer = C.layer_cases(dev, args.quick, compile_reference=not args.no_compile)
    models = C.model_cases(dev, args.quick)
    if args.only:
        layer = [c for c in layer if args.only in c.name]
        models = [c for c in models if args.only in c.name]
    for case in layer:
        _log(f"[bench] {case.name}")
        runner.run_layer_case(case)
    for mc in models:
        _log(f"[bench] {mc.name}")
        runner.run_model_case(mc)
    runner.add_floors()
    runner.add_ratios()
    csv_path = out / "results.csv"
    write_csv(runner.rows, csv_path)
    _log(f"[bench] wrote {csv_path} ({len(runner.rows)} rows) in {time.perf_counter() - start:.0f}s")
    if not args.no_plots:
        from .plots import scaling_plots
        for p in scaling_plots(csv_path, out, dev):
            _log(f"[bench] wrote {p}")
    return csv_path


if __name__ == "__main__":
    main()
