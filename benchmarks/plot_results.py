"""Draw the PNG plots of committed benchmark JSON (runs anywhere; needs matplotlib).

    python benchmarks/plot_results.py benchmarks/results/h200
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_ops(path: str) -> str:
    data = json.load(open(path))
    rows = data["rows"]
    variants = sorted({k[:-3] for r in rows for k in r if k.startswith("quantvla_") and k.endswith("_us")})
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), sharey=True)
    for ax, shape in zip(axes, shapes):
        rs = [r for r in rows if r["shape"] == shape]
        xs = range(len(rs))
        width = 0.8 / (len(variants) + 1)
        ax.bar([x - 0.4 + width / 2 for x in xs], [r["inductor_bf16_us"] / r["cublas_bf16_us"] for r in rs], width,
               label="cuBLAS bf16, linear alone (no norm)")
        for i, v in enumerate(variants):
            ax.bar([x - 0.4 + width * (i + 1.5) for x in xs],
                   [(r["inductor_bf16_us"] / r[f"{v}_us"]) if r.get(f"{v}_us") else 0 for r in rs], width, label=v)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [f"M={r['M']}" for r in rs])
        ax.set_title(f"{shape} ({rs[0]['K']}→{rs[0]['N']})", fontsize=9)
    axes[0].set_ylabel("speed-up vs Inductor bf16 (×)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"RMSNorm → linear, {data['meta']['gpu']} (CUDA graphs, L2 flushed)", fontsize=10)
    fig.tight_layout()
    out = path.replace(".json", ".png")
    fig.savefig(out, dpi=120)
    return out


def plot_e2e(paths: list) -> str:
    """Stacked kernel time by category per variant (one panel per horizon), latency on top."""
    cats = ("attention", "gemm", "w4a8", "inductor_triton", "other")
    variants = ("inductor_bf16", "quantvla_bf16", "quantvla_w4a8")
    fig, axes = plt.subplots(1, len(paths), figsize=(4.6 * len(paths), 3.8), squeeze=False)
    for ax, p in zip(axes[0], paths):
        d = json.load(open(p))
        vs = [v for v in variants if v in d]
        bottom = [0.0] * len(vs)
        for c in cats:
            h = [d[v]["by_category_ms"][c] for v in vs]
            ax.bar(range(len(vs)), h, 0.6, bottom=bottom, label=c)
            bottom = [b + x for b, x in zip(bottom, h)]
        for x, v in enumerate(vs):
            ax.text(x, bottom[x], f"{d[v]['latency_ms']:.1f} ms", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(vs)), [v.replace("_", "\n", 1) for v in vs], fontsize=8)
        ax.set_ylabel("kernel time per call (ms)")
        ax.set_title(f"Pi0.5 sample_actions, H={d['horizon']}, B=1 ({d['gpu']})", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(os.path.dirname(paths[0]), "bench_pi05.png")
    fig.savefig(out, dpi=120)
    return out


def main():
    d = sys.argv[1]
    if os.path.exists(os.path.join(d, "bench_ops.json")):
        print(plot_ops(os.path.join(d, "bench_ops.json")))
    e2e = sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith("bench_pi05_h") and f.endswith(".json"))
    if e2e:
        print(plot_e2e(e2e))


if __name__ == "__main__":
    main()
