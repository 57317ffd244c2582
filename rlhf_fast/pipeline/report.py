"""The run's markdown report and PNG plots (plots need matplotlib; without it the report says so)."""

from __future__ import annotations

from pathlib import Path

from rlhf_fast.pipeline.common import read_metrics
from rlhf_fast.pipeline.config import ALGORITHM_NAMES

PLOTS = {
    "sft": [("loss", "SFT loss (NLL per response token)")],
    "rm": [("loss", "ranking loss"), ("accuracy", "train pairwise accuracy")],
    "grpo": [("reward", "mean reward (gold rubric)"), ("kl", "KL to SFT per token"), ("loss", "policy loss"),
             ("gold_score", "gold score (held-out)")],
    "dpo": [("loss", "DPO loss"), ("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin")],
    "ppo": [("score", "RM score"), ("kl_per_token", "KL to SFT per token"), ("loss", "actor loss"),
            ("value_loss", "value loss"), ("ptx_loss", "ptx loss"), ("gold_score", "gold score (held-out)")],
}


def write_plots(out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stage, series in PLOTS.items():
        rows = read_metrics(out / stage / "metrics.jsonl")
        if not rows:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
        for ax, (key, title) in zip(axes[0], series, strict=True):
            pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], float)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        name = f"{stage}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def write_report(out, summary: dict, samples: dict, cfg, plots: bool = True) -> Path:
    out = Path(out)
    plot_files: list[str] = []
    plot_note = ""
    if plots:
        try:
            plot_files = write_plots(out)
        except ImportError:
            plot_note = "(plots skipped: matplotlib is not installed)"
    lines = ["# rlhf_fast pipeline run", "", f"Output directory: `{out}`", "", "## Summary", "",
             "| metric | value |", "|---|---|"]
    for k, v in summary.items():
        if k == "targets":
            continue
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "Targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in summary["targets"].items()),
              ""]
    if plot_files or plot_note:
        lines += ["## Curves", ""] + [f"![{p}]({p})" for p in plot_files] + ([plot_note] if plot_note else []) + [""]
    name = ALGORITHM_NAMES[summary.get("algorithm", "ppo")]
    lines += ["## Sample generations (held-out prompts)", "",
              f"The same held-out prompts, answered by the SFT model and by the {name} policy (the first sample of "
              f"each), with their gold scores.", "", f"| prompt | SFT answer | gold | {name} answer | gold |",
              "|---|---|---|---|---|"]
    firsts = {stage: {} for stage in ("sft", "ppo")}
    for stage in firsts:
        for s in samples.get(stage, []):
            firsts[stage].setdefault(s["prompt"], s)
    for prompt in list(firsts["sft"])[:16]:
        a, b = firsts["sft"][prompt], firsts["ppo"].get(prompt)
        cells = [_cell(prompt), _cell(a["response"]), f"{a['gold']:.2f}"]
        cells += [_cell(b["response"]), f"{b['gold']:.2f}"] if b else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
