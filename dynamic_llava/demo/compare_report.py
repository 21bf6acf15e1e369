"""The tables (table.md) and figures (PNGs) of `dynamic-llava demo compare`, from its results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.questions import SHORT_ANSWER_TYPES

GIGA = 1e9


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def short_answer_table(results: dict[str, Any]) -> str:
    majority, short, flops = results["majority_baseline"], results["short_answers"], results["prefill_flops"]
    header = ["method", "model", "image tokens kept", *SHORT_ANSWER_TYPES, "overall", "held-out pairs",
              "target / distractor patches kept %", "POPE F1 (mean)", "prefill GFLOPs, paper formula",
              "prefill GFLOPs, exact", "KV KiB / answer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| majority answer | - | - | " + " | ".join(_pct(majority["per_type"].get(c)) for c in SHORT_ANSWER_TYPES)
                 + f" | {_pct(majority['overall'])} | - | - | - | - | - | - |")
    for name, row in short.items():
        pope = row["pope"]
        f1 = sum(p["f1"] for p in pope.values()) / len(pope) if pope else None
        kept = row["kept_objects"]
        objects = f"{_pct(kept['targets'])} / {_pct(kept['distractors'])}"
        cells = [name, row["checkpoint"].replace("stage", "stage "),
                 f"{row['image_tokens_kept']:.1f} / {row['image_tokens']:.0f}",
                 *(_pct(row["per_type"].get(c)) for c in SHORT_ANSWER_TYPES), _pct(row["overall"]),
                 _pct(row["held_out"]), objects, _pct(f1),
                 f"{flops[name]['paper_formula'] / GIGA:.3f}", f"{flops[name]['exact'] / GIGA:.3f}",
                 f"{row['kv_cache_bytes'] / 1024:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sanity_table(results: dict[str, Any]) -> str:
    """Each check on every question and on one question type (results["sanity_checks"] is keyed by both)."""
    views = list(results["sanity_checks"])
    lines = ["| check (dense stage-2 model) | bound | " + " | ".join(f"{v}: points, passed" for v in views) + " |",
             "|---|---|" + "---|" * len(views)]
    for i, check in enumerate(results["sanity_checks"][views[0]]):
        cells = [f"{c['points']:+.1f}, {'yes' if c['passed'] else '**no**'}"
                 for c in (results["sanity_checks"][v][i] for v in views)]
        lines.append(f"| {check['check']} | {check['bound']:+.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval_table(results: dict[str, Any], key: str, label: str, verdict: str) -> str:
    """Claims or negative controls, per question set: difference, scene-bootstrap interval, verdict."""
    lines = [f"| {label} | questions | difference (points) | 95 % interval (scene bootstrap) | {verdict} |",
             "|---|---|---|---|---|"]
    for view, rows in results[key].items():
        for row in rows:
            outcome = row["met"] if "met" in row else row["held"]
            lines.append(f"| {row.get('claim', row.get('control'))} | {view} | {row['difference']:+.1f} | "
                         f"[{row['low']:+.1f}, {row['high']:+.1f}] | {'yes' if outcome else '**no**'} |")
    return "\n".join(lines)


def claims_table(results: dict[str, Any]) -> str:
    return _interval_table(results, "claims", "claim (20 % of image tokens)", "met")


def order_table(results: dict[str, Any]) -> str:
    """The order claim: each training's 20 % accuracy against FastV's and random's, and the verdict."""
    order = results["order"]
    lines = ["| training (seed) | Dynamic-LLaVA 20 % | FastV 20 % | random 20 % (5 seeds) | order holds |",
             "|---|---|---|---|---|"]
    for run in order["runs"]:
        lines.append(f"| {run['row']} | {_pct(run['dynamic_llava'])} | {_pct(order['fastv'])} | "
                     f"{_pct(order['random'])} | {'yes' if run['holds'] else '**no**'} |")
    trainings = len(order["runs"])
    verdict = "met" if order["met"] else ("**not met**" if trainings >= 2 else
                                          "**not checked**: one training (add one with --other-stage3)")
    return "\n".join(lines) + f"\n\n{order['claim']}: {verdict} ({trainings} training{'s' * (trainings > 1)})."


def controls_table(results: dict[str, Any]) -> str:
    return _interval_table(results, "negative_controls", "negative control (should hold)", "held")


def pope_table(results: dict[str, Any]) -> str:
    short = results["short_answers"]
    kinds = sorted(next(iter(short.values()))["pope"])
    header = ["method", *(f"{k} acc / F1" for k in kinds), "yes ratio (mean)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in short.items():
        pope = row["pope"]
        cells = [name, *(f"{_pct(pope[k]['accuracy'])} / {_pct(pope[k]['f1'])}" for k in kinds),
                 _pct(sum(p["yes_ratio"] for p in pope.values()) / len(pope))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generation_table(results: dict[str, Any]) -> str:
    header = ["method", "PPL", "METEOR", "output tokens kept / generated", "KV MiB (sum)", "KV vs dense"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in results["generation"].items():
        meteor = "n/a" if row["meteor"] is None else f"{row['meteor']:.4f}"
        ratio = row["kv_cache_bytes"] / row["kv_cache_bytes_dense"] if row["kv_cache_bytes_dense"] else None
        lines.append(f"| {name} | {row['ppl']:.3f} | {meteor} | {row['output_tokens_kept']} / {row['output_tokens']}"
                     f" | {row['kv_cache_bytes'] / 2**20:.2f} | {_pct(ratio)} % |")
    return "\n".join(lines)


def plot_accuracy_vs_flops(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short, flops = results["short_answers"], results["prefill_flops"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[tuple[float, float]]] = {}
    for name, row in short.items():
        families.setdefault(row["family"], []).append((flops[name]["exact"] / GIGA, 100 * row["overall"]))
    for family, points in families.items():
        points.sort()
        style = "*" if len(points) == 1 else "o-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=family, markersize=9 if
                len(points) == 1 else 5)
    ax.axhline(100 * results["majority_baseline"]["overall"], color="grey", linestyle=":", label="majority answer")
    ax.set_xlabel("prefill GFLOPs (exact count, one image, batch 1)")
    ax.set_ylabel("short-answer accuracy, overall (%)")
    ax.set_title("Accuracy vs prefill FLOPs (vision budgets 10 / 20 / 50 %)")
    _finish_line_plot(fig, ax, path)


def _finish_line_plot(fig: Any, ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kv_vs_output_length(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in results["generation"].items():
        curve = row["kv_curve_bytes"]
        ax.plot(range(1, len(curve) + 1), [b / 2**20 for b in curve], label=name)
    ax.set_xlabel("output tokens fed back (reference description, teacher forcing)")
    ax.set_ylabel("KV cache (MiB, one sample, all layers)")
    ax.set_title("KV-cache bytes vs output length")
    _finish_line_plot(fig, ax, path)


def plot_kept_patches(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from ..visualize import kept_patches_overlay

    kept = results["kept_patches"]
    rules = list(kept["masks"])
    titles = {"predictor": "Dynamic-LLaVA", "fastv": "FastV", "random": "random"}
    rows = len(kept["images"])
    fig, axes = plt.subplots(rows, len(rules) + 1, figsize=(2.4 * (len(rules) + 1), 2.4 * rows), squeeze=False)
    for r, image_path in enumerate(kept["images"]):
        image = Image.open(image_path).convert("RGB")
        panels = [image.resize((336, 336))] + [kept_patches_overlay(image, kept["masks"][rule][r], "pad")
                                                for rule in rules]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("image" if c == 0 else f"{titles.get(rules[c - 1], rules[c - 1])}", fontsize=10)
    fig.suptitle(f"Image patches kept at {100 * kept['vision_keep_rate']:.0f} % (dropped: grey)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> None:
    shape = results["shape"]
    text = [f"Model: {results['model']} (LLM {shape['llm_layers']} x {shape['llm_hidden']}, tower "
            f"{shape['tower_layers']} x {shape['tower_hidden']}, {shape['image_tokens']:.0f} image tokens, "
            f"{shape['prompt_text_tokens']} prompt text tokens, sparse layer {shape['sparse_layer']}); "
            f"{results['split']} split, {results['scenes']} scenes.", "",
            "Sanity checks (is token selection measurable here?):", "", sanity_table(results), "",
            "Claims:", "", claims_table(results), "", order_table(results), "",
            "Negative controls:", "", controls_table(results), "",
            "Short answers (accuracy %):", "", short_answer_table(results), "",
            "POPE (existence questions):", "", pope_table(results), "",
            "Long descriptions:", "", generation_table(results), ""]
    (out / "table.md").write_text("\n".join(text), encoding="utf-8")
    plot_accuracy_vs_flops(results, out / "accuracy_vs_flops.png")
    plot_kv_vs_output_length(results, out / "kv_vs_output_length.png")
    plot_kept_patches(results, out / "kept_patches.png")
