"""Plots the memory samples of a load run (bench/load/results/*.json).

    .venv/bin/python bench/load/plot.py RESULTS.json OUT.png

BEAM memory (:erlang.memory total), the engine's own allocation counter,
and the RSS of the VM, the port program and the gRPC gateway, in MiB over
minutes; the warm-up is shaded, and the title gives each series' band
(max/min - 1 after the warm-up) as the run computed it.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [("beam_total", "BEAM memory (erlang:memory total)"),
          ("engine_bytes", "engine allocations (NIF counter)"),
          ("beam_rss", "VM RSS"),
          ("port_rss", "port program RSS"),
          ("gateway_rss", "gRPC gateway RSS")]


def main(src, out):
    with open(src) as f:
        run = json.load(f)
    samples = run["memory"]
    t0 = samples[0]["t_ms"]
    minutes = [(s["t_ms"] - t0) / 60000 for s in samples]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for key, label in SERIES:
        ys = [s.get(key) for s in samples]
        if not any(isinstance(y, (int, float)) for y in ys):
            continue
        pts = [(x, y / 1048576) for x, y in zip(minutes, ys) if isinstance(y, (int, float))]
        band = run.get("memory_flatness", {}).get(key, {}).get("band")
        suffix = f" (band {band * 100:.1f}%)" if isinstance(band, (int, float)) else ""
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label + suffix)
    warm = run.get("warmup_s", 0) / 60
    if warm:
        ax.axvspan(0, warm, color="grey", alpha=0.15, label="warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    verdict = all(v.get("flat") for k, v in run.get("memory_flatness", {}).items()
                  if k in ("beam_total", "engine_bytes") and v.get("flat") is not None)
    rate = run["segments"][0][2] if run.get("segments") else None
    ax.set_title(f"{run['path']} {run['profile']}: {run['length_s'] / 60:.0f} min at "
                 f"{rate:.0f} ops/s, {run['sessions']} sessions; "
                 f"flat within {run['options']['memory_tolerance'] * 100:.0f}%: "
                 f"{'yes' if verdict else 'NO'}", fontsize=10)
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
