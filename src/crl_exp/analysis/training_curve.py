"""The training curve a reader checks first: CRL's train reward per PPO iteration against the baselines'."""

from __future__ import annotations

from pathlib import Path

STYLES = {"static": "tab:orange", "random": "tab:purple", "none": "tab:green", "untrained": "tab:gray",
          "class oracle": "black"}  # the baselines' and references' lines
RUN_COLOURS = ("tab:blue", "tab:red", "tab:brown", "tab:cyan", "tab:olive", "tab:pink")  # none of the above


def plot_training_curve(history: list[dict[str, float]], references: dict[str, float], title: str,
                        path: str | Path) -> Path:
    """PNG: mean train reward (and accuracy) per iteration, with each baseline's reward as a horizontal line
    (``references``: name -> reward measured on train/validation episodes, never test)."""
    return plot_training_curves({"CRL": history}, references, title, path, accuracy=True)


def plot_training_curves(histories: dict[str, list[dict[str, float]]], references: dict[str, float], title: str,
                         path: str | Path, accuracy: bool = False) -> Path:
    """One reward line per training run (e.g. one per seed), the baselines' rewards as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    by_episodes = all(h.get("train/episodes") for history in histories.values() for h in history)
    for i, (label, history) in enumerate(histories.items()):
        iterations = [h["train/episodes" if by_episodes else "iteration"] for h in history]
        ax.plot(iterations, [h["train/reward_mean"] for h in history], marker="o", markersize=3,
                color=RUN_COLOURS[i % len(RUN_COLOURS)], label=f"{label} train reward")
        if accuracy:
            ax.plot(iterations, [h["train/accuracy"] for h in history], marker=".", linestyle=":",
                    color="tab:gray", label=f"{label} train accuracy")
    for name, value in references.items():
        ax.axhline(value, linestyle="--", color=STYLES.get(name.split(" (")[0].removeprefix("held-out "), "black"),
                   label=f"{name} ({value:.3f})")
    ax.set_xlabel("training episodes" if by_episodes else "PPO iteration")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
