"""Scaling plots from the benchmark CSV: time against N and against D = C_in·k²."""
from __future__ import annotations

import csv
from pathlib import Path

STYLE = {
    "reference_eager": dict(color="tab:red", marker="o", label="reference (eager, authors' procedure)"),
    "reference_compile": dict(color="tab:orange", marker="v", label="reference (torch.compile)"),
    "cdfast": dict(color="tab:blue", marker="s", label="cdfast distill_layer (statistics + solve)"),
    "cdfast_statistics": dict(color="tab:green", marker="^", ls="--", label="cdfast statistics pass"),
    "cdfast_solver": dict(color="tab:purple", marker="D", ls=":", label="cdfast solver steps"),
}


def _load(csv_path: Path, device: str) -> list[dict]:
    with Path(csv_path).open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["device"] == device and r["status"] == "ok"]


def scaling_plots(csv_path: Path, out_dir: Path, device: str) -> list[Path]:
    """Write ``scaling_N_<device>.png`` and ``scaling_D_<device>.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    rows = _load(csv_path, device)
    written = []
    for kind, xcol, xlabel in (("scale_N", "n", "N (samples)"),
                               ("scale_D", "d", "D = C_in·k² (C_in → 64 channels, 3×3)")):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        first = sel[0]
        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
        for impl, st in STYLE.items():
            pts = sorted((float(r[xcol]), float(r["median_s"])) for r in sel if r["impl"] == impl)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1.8, ms=6, **st)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({float(r[xcol]) for r in sel})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("wall time per layer (s, median)")
        fixed = ("32→32 3×3 at 16 px" if kind == "scale_N"
                 else f"N = {first['n']} at {first['hw']} px")
        threads = f", {first['torch_threads']} torch thread(s)" if first.get("torch_threads") else ""
        ax.set_title(f"time vs {kind[-1]}: {fixed}, {first['steps']} Adam steps, keep 0.5\n"
                     f"{first['device_name']}{threads} ({first['mode']} run {first['run_id']})", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        path = Path(out_dir) / f"scaling_{kind[-1]}_{device}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> None:
    """``python -m bench.plots [--csv bench/results/results.csv] [--device cpu]``: redraw the plots."""
    import argparse

    from .harness import REPO

    ap = argparse.ArgumentParser(prog="python -m bench.plots")
    ap.add_argument("--csv", default=str(REPO / "bench" / "results" / "results.csv"))
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    for p in scaling_plots(Path(a.csv), Path(a.csv).parent, a.device):
        print(p)


if __name__ == "__main__":
    main()
