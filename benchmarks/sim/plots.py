"""PNGs for the docs (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cost_plot(rows: list[dict], path: Path) -> None:
    """Messages/node/s and CPU %/node vs N, legacy vs new, idle and light load."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {("legacy", False): ("tab:red", "-", "legacy (2 s), idle"),
              ("legacy", True): ("tab:red", "--", "legacy (2 s), light load"),
              ("new", False): ("tab:blue", "-", "new (refresh 10 s/peer, 30-600 s), idle"),
              ("new", True): ("tab:blue", "--", "new (refresh 10 s/peer, 30-600 s), light load")}
    for (mode, load), (color, ls, label) in styles.items():
        pts = sorted((r["n"], r) for r in rows if r["mode"] == mode and r["load"] == load)
        if not pts:
            continue
        ns = [n for n, _ in pts]
        axes[0].plot(ns, [r["msgs_per_s"] for _, r in pts], color=color, ls=ls, marker="o", label=label)
        axes[1].plot(ns, [r["cpu_pct"] for _, r in pts], color=color, ls=ls, marker="o", label=label)
    axes[0].set_ylabel("pubsub RPC copies per node per second")
    axes[1].set_ylabel("CPU-equivalent, % of one core per node")
    axes[1].axhline(100, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes in the mesh (N)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Mesh simulation: announcement cost per node vs mesh size (model; rpc_ms, ping_ms fitted to real nodes)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def balance_plot(results: list[dict], path: Path) -> None:
    """Share of requests per serving peer: the real router vs the oracle."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        speeds = res["speeds"]
        xs = range(len(speeds))
        ax.bar([x - 0.2 for x in xs], [100 * s for s in res["mesh"]["share"]], width=0.4, label="routing.choose")
        ax.bar([x + 0.2 for x in xs], [100 * s for s in res["oracle"]["share"]], width=0.4, label="oracle")
        if "proportional_share" in res:
            ax.plot(list(xs), [100 * s for s in res["proportional_share"]], "k_", ms=28, mew=2,
                    label="proportional to speed")
        ax.set_xticks(list(xs), [f"speed {s:g}" for s in speeds])
        ax.set_ylabel("% of requests")
        ax.set_title(f"{res['mode']} cadence: max diff {res['max_share_diff_pp']} pp")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
