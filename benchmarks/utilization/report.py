"""The study's report: the PNGs and ``docs/utilization_study.md``, written from the JSON alone.

Every sentence of the findings is computed from the summarized figures, so the page can be
regenerated from ``benchmarks/results/utilization_study.json`` without training anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from benchmarks.utilization.rows import ROWS

JSON_REL = Path("benchmarks/results/utilization_study.json")
MD_REL = Path("docs/utilization_study.md")
IMG_REL = Path("docs/images")
# The same study on the avatar set at large K (issue 13) writes beside it under its own name.
LARGE_K_JSON_REL = Path("benchmarks/results/large_k_study.json")
LARGE_K_MD_REL = Path("docs/large_k_study.md")
FLIP_JSON_REL = Path("benchmarks/results/large_k_flip.json")  # benchmarks/flip_ablation.py


def paths_for(data: str) -> tuple[Path, Path]:
    """(JSON, markdown) paths relative to the output root for the study on ``data``."""
    return (LARGE_K_JSON_REL, LARGE_K_MD_REL) if data == "avatars" else (JSON_REL, MD_REL)


# Issue 6's targets for the default row.
TARGET_UTILIZATION = 0.99
TARGET_ENTROPY = 0.95
TARGET_PSNR_MARGIN = 0.1
TARGET_TIME_RATIO = 1.1


def _ordered(rows: dict) -> list[str]:
    return sorted(rows, key=lambda n: ROWS[n].number if n in ROWS else 99)


def _style(name: str, i: int, cmap: Any) -> dict:
    # the default stands out in black, the peer dashed; the others take tab10 in row order
    if name == "default":
        return {"color": "black", "lw": 2.2}
    return {"color": cmap(i % 10), "lw": 1.4, "ls": "--" if name == "peer" else "-"}


def plot(
    runs: list[dict], summary: dict, img_dir: Path, prefix: str = "utilization_study"
) -> dict[str, list[Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for k, rows in summary.items():
        names = _ordered(rows)
        cmap = plt.get_cmap("tab10")
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for i, name in enumerate(names):
            rs = [r for r in runs if r["row"] == name and str(r["codebook_size"]) == k]
            steps = [p["step"] for p in rs[0]["curve"]]
            util = [
                sum(r["curve"][j]["utilization"] for r in rs) / len(rs) for j in range(len(steps))
            ]
            ax.plot(
                steps,
                util,
                marker=".",
                label=f"{ROWS[name].number} {name}",
                **_style(name, i, cmap),
            )
        ax.set_xlabel("training step")
        ax.set_ylabel("validation-split utilization")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Codebook utilization over training, K={k} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        curves = img_dir / f"{prefix}_curves_K{k}.png"
        fig.savefig(curves, dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 4.8))
        for i, name in enumerate(names):
            rs = [r for r in runs if r["row"] == name and str(r["codebook_size"]) == k]
            sorted_counts = [
                torch.tensor(r["counts"], dtype=torch.float64).sort(descending=True).values
                for r in rs
            ]
            mean = torch.stack(sorted_counts).mean(0)
            share = mean / mean.sum().clamp_min(1)
            rank = torch.arange(1, len(share) + 1)
            keep = share > 0
            ax.loglog(
                rank[keep],
                share[keep],
                label=f"{ROWS[name].number} {name}",
                **_style(name, i, cmap),
            )
        ax.axhline(1 / int(k), color="k", lw=0.8, ls="--", label="uniform 1/K")
        ax.set_xlabel("code rank")
        ax.set_ylabel("share of validation tokens")
        ax.set_title(f"Rank-frequency of validation code use, K={k} (seed mean)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        rankf = img_dir / f"{prefix}_rank_frequency_K{k}.png"
        fig.savefig(rankf, dpi=110)
        plt.close(fig)
        written[k] = [curves, rankf]
    return written


def _f(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def uniform_ceiling(codebook_size: int, tokens: int) -> float:
    """Expected fraction of ``codebook_size`` codes hit by ``tokens`` draws from the uniform
    distribution, 1 - (1 - 1/K)^N: what a perfectly even codebook shows on a split of that size."""
    return 1.0 - (1.0 - 1.0 / codebook_size) ** tokens


# Issue 13's targets for the default on the avatar set: codes used per codebook size, PSNR at
# least every other row's, training time at most this times the fastest row's.
LARGE_K_UTILIZATION = {16384: 0.99, 65536: 0.97}
LARGE_K_TIME_RATIO = 1.1


def _common(rows: dict, a: str, b: str, key: str) -> tuple[float, float, str]:
    """Rows ``a`` and ``b``'s means of ``key`` over the seeds both ran (all of each when they ran
    the same seeds or none in common), and a note naming those seeds when they are fewer."""
    sa, sb = rows[a].get("seeds"), rows[b].get("seeds")
    common = [sd for sd in sa or [] if sd in (sb or [])]
    if not common or (sorted(sa) == sorted(sb)):
        return rows[a][key], rows[b][key], ""

    def mean(n: str) -> float:
        v = [
            x
            for sd, x in zip(rows[n]["seeds"], rows[n]["per_seed"][key], strict=True)
            if sd in common
        ]
        return sum(v) / len(v)

    which = ", ".join(str(sd) for sd in common)
    return mean(a), mean(b), f" (seed{'s' * (len(common) > 1)} {which}, the seeds both ran)"


def large_k_checks(k: str, rows: dict) -> list[tuple[str, bool, str]]:
    """The default against issue 13's targets at codebook size ``k`` (name, met, figures). PSNR
    and time compare the default with each row on the seeds both ran."""
    d = rows["default"]
    others = [n for n in _ordered(rows) if n != "default"]
    checks = []
    want = LARGE_K_UTILIZATION.get(int(k))
    if want is not None:
        checks.append(
            (
                f"utilization >= {want:.0%}",
                d["utilization"] >= want,
                f"{100 * d['utilization']:.2f}% ({d['used_codes']:.1f} of {k} codes)",
            )
        )
    if others:
        psnr = {n: _common(rows, "default", n, "psnr") for n in others}
        bo = max(others, key=lambda n: psnr[n][1] - psnr[n][0])
        mine, theirs, note = psnr[bo]
        checks.append(
            (
                "PSNR >= every other row",
                mine >= theirs,
                f"{_f(mine, 2)} dB vs the best other, row {ROWS[bo].number} `{bo}` "
                f"{_f(theirs, 2)} dB{note}",
            )
        )
        secs = {n: _common(rows, "default", n, "train_seconds") for n in others}
        fast = max(others, key=lambda n: secs[n][0] / secs[n][1])
        mine, theirs, note = secs[fast]
        ratio = mine / theirs
        checks.append(
            (
                f"training time <= {LARGE_K_TIME_RATIO}x the fastest row",
                ratio <= LARGE_K_TIME_RATIO,
                f"{mine:.0f} s vs row {ROWS[fast].number} `{fast}` {theirs:.0f} s ({ratio:.2f}x)"
                f"{note}",
            )
        )
    return checks


def findings(k: str, rows: dict, tokens: int | None = None, *, large_k: bool = False) -> list[str]:
    """One paragraph per finding, every statement computed from the numbers. ``tokens``: the
    validation split's token count (for the uniform-use ceiling); ``large_k``: the avatar study,
    judged against issue 13's targets instead of issue 6's."""
    out: list[str] = []
    ceiling = uniform_ceiling(int(k), tokens) if tokens else None
    if ceiling is not None and ceiling < TARGET_UTILIZATION:
        best = max(_ordered(rows), key=lambda n: rows[n]["utilization"])
        out.append(
            f"**Ceiling.** {tokens} validation tokens cannot hit all {k} codes: drawn from a "
            f"perfectly even codebook they would hit {100 * ceiling:.1f}% of them on average "
            f"(1 - (1 - 1/K)^N), so the {TARGET_UTILIZATION:.0%} target is out of reach of every "
            f"row at this size. The highest, row {ROWS[best].number} `{best}`, reaches "
            f"{100 * rows[best]['utilization']:.1f}%, {rows[best]['utilization'] / ceiling:.2f} of "
            "the ceiling."
        )
    names = _ordered(rows)
    collapsed = [n for n in names if rows[n]["utilization"] < 0.25]
    partial = [n for n in names if 0.25 <= rows[n]["utilization"] < 0.9]
    full = [n for n in names if rows[n]["utilization"] >= 0.99]

    def lst(ns: list[str]) -> str:
        return ", ".join(
            f"{ROWS[n].number} `{n}` ({100 * rows[n]['utilization']:.1f}%)" for n in ns
        )

    out.append(
        "**Collapse.** "
        + (
            f"Rows using under 25% of the codes: {lst(collapsed)}. "
            if collapsed
            else "No row uses under 25% of the codes. "
        )
        + (f"Partly used (25-90%): {lst(partial)}. " if partial else "")
        + (f"At least 99% used: {lst(full)}." if full else "No row reaches 99% utilization.")
    )
    best_psnr = max(names, key=lambda n: rows[n]["psnr"])
    best_util = max(names, key=lambda n: (rows[n]["utilization"], rows[n]["normalized_entropy"]))
    worst_psnr = min(names, key=lambda n: rows[n]["psnr"])
    out.append(
        f"**Reconstruction.** Best validation PSNR: row {ROWS[best_psnr].number} `{best_psnr}` "
        f"({_f(rows[best_psnr]['psnr'], 2)} dB, SSIM {_f(rows[best_psnr]['ssim'])}); worst: row "
        f"{ROWS[worst_psnr].number} `{worst_psnr}` ({_f(rows[worst_psnr]['psnr'], 2)} dB). "
        f"Highest utilization: row {ROWS[best_util].number} `{best_util}` "
        f"({100 * rows[best_util]['utilization']:.1f}%, normalized entropy "
        f"{_f(rows[best_util]['normalized_entropy'])})."
    )
    if "default" in rows and large_k:
        checks = large_k_checks(k, rows)
        met = sum(ok for _, ok, _ in checks)
        out.append(
            f"**The default against issue 13's targets ({met} of {len(checks)} met).** "
            + "; ".join(f"{name}: {'met' if ok else 'MISSED'} ({val})" for name, ok, val in checks)
            + "."
        )
    elif "default" in rows:
        d = rows["default"]
        others = [n for n in names if n != "default"]
        checks = [
            (
                f"utilization >= {TARGET_UTILIZATION:.0%}",
                d["utilization"] >= TARGET_UTILIZATION,
                f"{100 * d['utilization']:.2f}% ({d['used_codes']:.1f} of {k} codes)",
            ),
            (
                f"normalized entropy >= {TARGET_ENTROPY}",
                d["normalized_entropy"] >= TARGET_ENTROPY,
                _f(d["normalized_entropy"]),
            ),
        ]
        if others:
            bo = max(others, key=lambda n: rows[n]["psnr"])
            checks.append(
                (
                    f"PSNR >= best other row - {TARGET_PSNR_MARGIN} dB",
                    d["psnr"] >= rows[bo]["psnr"] - TARGET_PSNR_MARGIN,
                    f"{_f(d['psnr'], 2)} dB vs row {ROWS[bo].number} `{bo}` "
                    f"{_f(rows[bo]['psnr'], 2)} dB",
                )
            )
        if "peer" in rows:
            p = rows["peer"]
            ratio = d["train_seconds"] / p["train_seconds"]
            checks += [
                (
                    "utilization above the peer (row 10)",
                    d["utilization"] > p["utilization"],
                    f"{100 * d['utilization']:.2f}% vs {100 * p['utilization']:.2f}%",
                ),
                (
                    "PSNR above the peer",
                    d["psnr"] > p["psnr"],
                    f"{_f(d['psnr'], 2)} vs {_f(p['psnr'], 2)} dB",
                ),
                (
                    f"training time <= {TARGET_TIME_RATIO}x the peer's",
                    ratio <= TARGET_TIME_RATIO,
                    f"{d['train_seconds']:.0f} s vs {p['train_seconds']:.0f} s ({ratio:.2f}x)",
                ),
            ]
        met = sum(ok for _, ok, _ in checks)
        scope = "" if int(k) == 1024 else ", set for K=1024 and shown here for reference"
        out.append(
            f"**The default against issue 6's targets ({met} of {len(checks)} met{scope}).** "
            + "; ".join(f"{name}: {'met' if ok else 'MISSED'} ({val})" for name, ok, val in checks)
            + "."
        )
    if "seed002" in rows:
        s = rows["seed002"]
        hope = (
            "inside"
            if 0.3 <= s["utilization"] <= 0.5
            else ("above" if s["utilization"] > 0.5 else "below")
        )
        out.append(
            f"**Seed 002's recipe** uses {100 * s['utilization']:.1f}% of the codes "
            f"(normalized entropy {_f(s['normalized_entropy'])}, PSNR {_f(s['psnr'], 2)} dB): "
            f"{hope} the 30-50% the seed hoped for."
        )
    if "plain" in rows:
        base = rows["plain"]["train_seconds"]
        costs = ", ".join(
            f"{ROWS[n].number} `{n}` {rows[n]['train_seconds'] / base:.2f}x"
            for n in names
            if n != "plain"
        )
        out.append(
            f"**Training time** relative to row 1 (plain, {base:.0f} s): {costs}. "
            "Times are the sum of training-step times, validation excluded."
        )
    spread = max(
        names,
        key=lambda n: (
            max(rows[n]["per_seed"]["utilization"]) - min(rows[n]["per_seed"]["utilization"])
        ),
    )
    su = rows[spread]["per_seed"]["utilization"]
    if len(su) > 1:
        out.append(
            f"**Seeds.** The largest seed-to-seed spread in utilization is row "
            f"{ROWS[spread].number} `{spread}`: "
            + " / ".join(f"{100 * u:.1f}%" for u in su)
            + "; per-seed figures are in the JSON."
        )
    return out


def _augmentation_text(flip_p: float, avatars: bool) -> str:
    text = f"training images colour-jittered (0.1) and flipped with probability {flip_p:g}"
    if avatars and flip_p == 0:
        text += (
            " (DiceBear draws every avatar with one handedness, so a flipped avatar is one the "
            "validation split never shows; what flips cost is measured under 'Why no flips' "
            "below)"
        )
    return text


def machine_text(machine: dict) -> str:
    """CPU model (or 'CPU model not recorded'), cores and torch of a study's ``machine``."""
    cpu = machine.get("cpu_model") or f"{machine.get('processor')}, CPU model not recorded"
    return f"{cpu}, {machine.get('cpu_cores')} cores, torch {machine.get('torch')}"


def _machines(result: dict, threads: int) -> list[str]:
    """The machine line; a merged study whose parts ran on different machines names each
    machine with the commands that ran on it."""
    parts = result.get("machines")
    if not parts:
        return [f"Machine: {machine_text(result['machine'])}, {threads} threads."]
    lines = [f"Machines ({threads} threads):", ""]
    for part in parts:
        cmds = "; ".join(f"`{c.split('  #')[0].strip()}`" for c in part["commands"])
        lines.append(f"- {part['machine']}: {cmds}")
    return lines


def _commands(command: str) -> list[str]:
    cmds = command.split("\n")
    if len(cmds) == 1:
        return [f"Command: `{cmds[0]}`"]
    head = "Commands (run in parallel, each with its own `--out`, then merged with `--merge`):"
    return [head, "", *(f"- `{c}`" for c in cmds)]


def flip_section(flip: dict) -> list[str]:
    """'Why no flips': the figures of ``benchmarks/flip_ablation.py``."""
    s = flip["settings"]
    lines = [
        "## Why no flips",
        "",
        f"Generated from `{FLIP_JSON_REL.as_posix()}` (`{flip['command'].strip()}`; machine: "
        f"{flip['machine'].get('cpu_model')}, {s['threads']} thread). DiceBear draws every "
        "avatar with one handedness, so a flipped training avatar is an image the validation "
        "split never shows. Each row below trained "
        f"{s['steps']} steps at K={s['codebook_size']:,} (seed {s['seed']}) with flips of the "
        "given probability; its codes are counted on the "
        f"{s['val_images']:,} clean validation avatars ({s['val_tokens']:,} tokens) and on as "
        "many augmented training avatars, the distribution the codebook was fitted to.",
        "",
        "| row | flip probability | codes used: validation | codes used: augmented training "
        "| PSNR (dB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in flip["runs"]:
        lines.append(
            f"| `{r['row']}` | {r['flip_p']:g} | {100 * r['utilization']:.1f}% | "
            f"{100 * r['train_utilization']:.1f}% | {r['psnr']:.2f} |"
        )
    return lines + [""]


def markdown(
    result: dict, images: dict[str, list[Path]], md_path: Path, flip: dict | None = None
) -> str:
    s = result["settings"]
    avatars = s.get("data") == "avatars"
    json_rel = paths_for(s.get("data", "emoji"))[0]
    data_text = (
        f"the avatar set (`vqkit data fetch avatars`: {s['train_images']:,} training and "
        f"{s['val_images']:,} validation avatars drawn at 256 px, resized)"
        if avatars
        else "the bundled Fluent Emoji 3D set"
    )
    lines = [
        "# Large codebooks on the avatar set" if avatars else "# Codebook utilization study",
        "",
        "Generated by `benchmarks/utilization_study.py` "
        + ("(issue 13, `--data avatars`)" if avatars else "(issue 6)")
        + f" from `{json_rel}`; do not edit by hand.",
        "",
        *_commands(result["command"]),
        "",
        *_machines(result, s["threads"]),
        "",
        f"Setup: the quickstart model (`configs/quickstart.yaml`) on {data_text}, "
        f"{s['image_size']} px, batch {s['batch_size']}, "
        + _augmentation_text(s.get("flip_p", 0.5), avatars)
        + ", the same split, batches, AdamW + "
        "warm-up/cosine schedule and seeds for every row; step budget "
        + ", ".join(f"{v} steps at K={k}" for k, v in s["steps"].items())
        + f"; seeds {s['seeds']}. Schedules of the maintenance strategies (and the LR warm-up) "
        f"are the quickstart's scaled by {s['schedule_scale']}"
        + (" (the YAML's own numbers)" if s["schedule_scale"] == 1.0 else "")
        + f". Validation: {s['val_images']} held-out images "
        f"({s['val_images'] * s['tokens_per_image']} tokens), indices counted by "
        "`vqkit.CodeUsage` for every row (the peer included); the curves are the "
        f"validation-split utilization every {s['curve_every']} steps"
        + (
            f" on its first {s['curve_images']:,} images"
            if s.get("curve_images", s["val_images"]) < s["val_images"]
            else ""
        )
        + ". The ceiling column is what a perfectly even codebook would show on this split, "
        "1 - (1 - 1/K)^N for N validation tokens. Training time is the sum "
        "of the training-step times (data loading and validation excluded); it compares rows only "
        "when nothing else ran on the machine, so the CPU time of the same steps (all threads) "
        "is reported beside it.",
        "",
    ]
    for k, rows in result["summary"].items():
        names = _ordered(rows)
        ceiling = uniform_ceiling(int(k), s["val_images"] * s["tokens_per_image"])
        lines += [
            f"## K = {k}",
            "",
            f"{s['steps'][k]} training steps per run; the validation split holds "
            f"{s['val_images'] * s['tokens_per_image'] / int(k):.1f} tokens per code.",
            "",
            "| # | row | utilization | ceiling | used | perplexity | norm. entropy | dead | L1 "
            "| PSNR (dB) | SSIM | train time (s) | train CPU (s) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in names:
            r = rows[n]
            lines.append(
                f"| {ROWS[n].number} | {ROWS[n].title} (`{n}`) | {100 * r['utilization']:.1f}% | "
                f"{100 * ceiling:.1f}% | "
                f"{r['used_codes']:.1f} | {r['perplexity']:.1f} | {_f(r['normalized_entropy'])} | "
                f"{r['dead_codes']:.1f} | {_f(r['l1'], 4)} | {_f(r['psnr'], 2)} | "
                f"{_f(r['ssim'])} | "
                f"{r['train_seconds']:.0f} | {r['train_cpu_seconds']:.0f} |"
            )
        seeds = sorted({sd for n in names for sd in rows[n]["seeds"]})
        lines += [
            "",
            "Means over seeds. Per seed (utilization / PSNR / train time):",
            "",
            "| row | " + " | ".join(f"seed {sd}" for sd in seeds) + " |",
            "|---|" + "---:|" * len(seeds),
        ]
        for n in names:
            ps = rows[n]["per_seed"]
            by_seed = {
                sd: f"{100 * u:.1f}% / {p:.2f} / {t:.0f} s"
                for sd, u, p, t in zip(
                    rows[n]["seeds"],
                    ps["utilization"],
                    ps["psnr"],
                    ps["train_seconds"],
                    strict=True,
                )
            }
            cells = [by_seed.get(sd, "-") for sd in seeds]
            lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
        lines += ["", "### Findings", ""]
        tokens = s["val_images"] * s["tokens_per_image"]
        for para in findings(k, rows, tokens, large_k=avatars):
            lines += [para, ""]
        for img in images.get(k, []):
            rel = img.relative_to(md_path.parent) if img.is_relative_to(md_path.parent) else img
            lines += [f"![{img.stem}]({rel.as_posix()})", ""]
    if flip is not None:
        lines += flip_section(flip)
    lines += ["## Rows", ""]
    ran = {r["row"] for r in result["runs"]}
    lines += [f"- row {ROWS[n].number}, `{n}`: {ROWS[n].recipe}." for n in ROWS if n in ran]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> Path:
    """Write the PNGs under ``out / IMG_REL`` and the markdown at ``out / MD_REL`` from a result
    that holds its ``summary``; return the markdown's path."""
    md_rel = paths_for(result["settings"].get("data", "emoji"))[1]
    images = plot(result["runs"], result["summary"], out / IMG_REL, prefix=md_rel.stem)
    md_path = out / md_rel
    md_path.parent.mkdir(parents=True, exist_ok=True)
    flip_json = out / FLIP_JSON_REL
    flip = None
    if result["settings"].get("data") == "avatars" and flip_json.exists():
        flip = json.loads(flip_json.read_text())
    md_path.write_text(markdown(result, images, md_path, flip))
    return md_path
