"""The training curve a reader checks first: CRL's train reward per PPO iteration against the baselines'."""

from __future__ import annotations

from pathlib import Path


def plot_training_curve(history: list[dict[str, float]], references: dict[str, float], title: str,
                        path: str | Path) -> Path:
    """PNG: mean train reward (and accuracy) per iteration, with each baseline's reward as a horizontal line
    (``references``: name -> reward measured on train/validation episodes, never test)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(iterations, [h["train/reward_mean"] for h in history], marker="o", label="CRL train reward")
    ax.plot(iterations, [h["train/accuracy"] for h in history], marker=".", linestyle=":", color="tab:gray",
            label="CRL train accuracy")
    styles = {"static": "tab:orange", "random": "tab:purple", "none": "tab:green"}
    for name, value in references.items():
        ax.axhline(value, linestyle="--", color=styles.get(name, "black"), label=f"{name} ({value:.3f})")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
