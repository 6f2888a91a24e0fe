"""Pictures of a run for a report or a docs page: its curves and its last reconstruction grid.

    python -m tools.plot_run runs/mae_quickstart --out docs/images/mae_quickstart

writes
  OUT_curves.png           training loss over steps (raw and smoothed), and each evaluation
                           the run logged: masked error next to the best constant guess (or
                           BEiT's masked-token accuracy next to the most frequent token), and
                           the top-1 accuracy of kNN / linear probe / fine-tuning evaluators
                           (at step 0 the random-init accuracy, when `python -m
                           mim_jax.evaluate` has written WORKDIR/evaluation.json);
  OUT_reconstructions.png  the newest grid in WORKDIR/reconstructions/ (columns: original |
                           masked | reconstruction | reconstruction pasted into the visible
                           patches), when the run wrote one.

Everything comes from WORKDIR/metrics.jsonl, so it works on a finished run, a run in progress
and a copied workdir alike, local or in a bucket (gs://BUCKET/path). Rows that a resumed run
logged twice keep the later value.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
from etils import epath

_MAX_BYTES = 200_000  # docs pictures stay small
_LOSS_SMOOTHING = 0.9  # exponential moving average for the smoothed loss line
_SMOOTH_FROM = 50  # log points from which the loss is also drawn smoothed


def read_metrics(path: str) -> dict[str, dict[int, float]]:
    """metrics.jsonl -> {key: {step: value}} for every scalar key (later rows win)."""
    series: dict[str, dict[int, float]] = {}
    with epath.Path(path).open() as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write can leave a partial last line; skip it, say so.
                print(f"{path}:{number}: not a JSON line; skipped.", file=sys.stderr)
                continue
            step = row.pop("step", None)
            for key, value in row.items():
                if step is not None and isinstance(value, (int, float)):
                    series.setdefault(key, {})[int(step)] = float(value)
    return series


def _xy(points: dict[int, float]):
    steps = np.array(sorted(points))
    return steps, np.array([points[s] for s in steps])


def _smooth(values: np.ndarray, alpha: float) -> np.ndarray:
    out, acc = np.empty_like(values), values[0]
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v
        out[i] = acc
    return out


def accuracy_keys(series) -> list[str]:
    """Evaluator top-1 keys ('knn/top1', 'linear_probe/top1', ...), best-so-far excluded."""
    return sorted(k for k in series if k.endswith("/top1") and not k.endswith("best_top1"))


def random_init_accuracy(workdir: str) -> dict[str, float]:
    """{'knn': top-1, 'linear_probe': top-1} of the same encoder at random init (mean over
    seeds), from the evaluation.json that `python -m mim_jax.evaluate` wrote, if any."""
    path = epath.Path(workdir) / "evaluation.json"
    if not path.exists():
        return {}
    frozen = json.loads(path.read_text()).get("frozen", {})
    return dict(frozen.get("random_init", {}))


def plot_curves(series, title: str, path: str, random_init=None):
    """`random_init`: accuracies drawn at step 0 (see random_init_accuracy)."""
    random_init = random_init or {}
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = ["loss"]
    if "masked_error" in series:
        panels.append("masked_error")
    elif "mim_accuracy" in series:  # BEiT: predicted tokens instead of pixels
        panels.append("token_accuracy")
    if accuracy_keys(series):
        panels.append("accuracy")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    last_step = max(series["loss"])
    for ax, panel in zip(axes[0], panels):
        if panel == "loss":
            steps, loss = _xy(series["loss"])
            if len(loss) >= _SMOOTH_FROM:
                ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1, label="logged")
                ax.plot(steps, _smooth(loss, _LOSS_SMOOTHING), color="tab:blue", lw=2,
                        label="smoothed")
            else:  # a few log points: an average would only lag behind them
                ax.plot(steps, loss, ".-", color="tab:blue", label="logged")
            ax.set_title("training loss")
        elif panel == "masked_error":
            steps, err = _xy(series["masked_error"])
            ax.plot(steps, err, "o-", color="tab:red", label="model")
            if "masked_error_constant" in series:
                c_steps, const = _xy(series["masked_error_constant"])
                ax.plot(c_steps, const, "--", color="gray", label="best constant guess")
            ax.set_ylim(bottom=0)
            ax.set_title("masked error (evaluation images)")
        elif panel == "token_accuracy":
            steps, acc = _xy(series["mim_accuracy"])
            ax.plot(steps, 100 * acc, ".-", color="tab:red", label="model")
            if "mim_accuracy_most_frequent_token" in series:
                c_steps, const = _xy(series["mim_accuracy_most_frequent_token"])
                ax.plot(c_steps, 100 * const, "--", color="gray",
                        label="most frequent token")
            ax.set_ylim(bottom=0)
            ax.set_ylabel("%")
            ax.set_title("masked-token accuracy (training batches)")
        else:
            for key in accuracy_keys(series):
                name = key.split("/")[0]
                points = dict(series[key])
                if name in random_init:
                    points[0] = random_init[name]
                steps, acc = _xy(points)
                acc = 100 * acc if acc.max() <= 1.0 else acc
                line, = ax.plot(steps, acc, "o-", label=name.replace("_", " "))
                if name in random_init:
                    ax.plot([0], [acc[0]], "s", mfc="white", color=line.get_color())
            if random_init:
                ax.plot([], [], "s", mfc="white", color="gray",
                        label="step 0: random init\n(mim_jax.evaluate)")
            ax.set_ylim(0, 100)
            ax.set_ylabel("top-1 %")
            ax.set_title("evaluation accuracy")
        ax.set_xlabel("step")
        ax.set_xlim(-0.03 * last_step, 1.03 * last_step)  # one step axis for all panels
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def copy_grid(workdir: str, path: str) -> str | None:
    """Re-save the newest reconstruction grid, halving it until it is under _MAX_BYTES."""
    grids = sorted(str(p) for p in epath.Path(workdir).glob("reconstructions/step_*.png"))
    if not grids:
        return None
    from PIL import Image
    image = Image.open(io.BytesIO(epath.Path(grids[-1]).read_bytes())).convert("RGB")
    while True:
        image.save(path, optimize=True)
        if os.path.getsize(path) <= _MAX_BYTES or min(image.size) < 64:
            return grids[-1]
        image = image.resize((image.width // 2, image.height // 2), Image.LANCZOS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a run's workdir (holds metrics.jsonl)")
    parser.add_argument("--out", required=True,
                        help="path prefix of the PNGs: OUT_curves.png, OUT_reconstructions.png")
    parser.add_argument("--title", default=None, help="figure title (default: the workdir)")
    args = parser.parse_args(argv)

    metrics = os.path.join(args.workdir, "metrics.jsonl")
    if not epath.Path(metrics).exists():
        parser.exit(2, f"{metrics} does not exist; pass the workdir of a run.\n")
    series = read_metrics(metrics)
    if "loss" not in series:
        parser.exit(2, f"{metrics} has no 'loss' rows yet; the run logs its first after "
                       "config.log_every steps.\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    curves = args.out + "_curves.png"
    plot_curves(series, args.title or os.path.basename(os.path.normpath(args.workdir)), curves,
                random_init_accuracy(args.workdir))
    print(f"wrote {curves} ({os.path.getsize(curves) // 1000} KB)")
    grid = args.out + "_reconstructions.png"
    source = copy_grid(args.workdir, grid)
    if source:
        print(f"wrote {grid} ({os.path.getsize(grid) // 1000} KB) from {source}")


if __name__ == "__main__":
    main()
