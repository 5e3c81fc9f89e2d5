"""The report: one offline HTML page, ``reports/index.html``, of what the pipeline measured and made.

Read only from what the stages already wrote (``metrics/*.json``, ``plots/dynamics-<ds>.json``,
``reports/<ds>/media.json`` and its media, ``data/gameplay/frames_manifest.csv``, ``params.yaml``)
and, for the change against the committed figures, from ``git show HEAD:metrics/evaluate-<ds>.json``.
Per dataset: the headline figures with their 95 % intervals beside their baselines and their change
from HEAD, the per-horizon plots, contact sheet, side-by-side rollouts and imagined episodes (linked
relatively: the page sits in ``reports/``, the media in ``reports/<ds>/``), the data (videos and
their failures, the action extractor's confusion matrix), the tokenizer, the training loss curves
(inline SVG, drawn here: no script, no font, nothing fetched), then what made it (the git commit and
whether the tree was dirty, the params.yaml sections outputs depend on, each stage's run time) and the page's limits.

Every text is escaped (``html.escape``); the page is the same bytes for the same inputs, except the
line naming the commit and the dirty state. MLflow run ids are not shown: the tracking store is not
an input of the stage (it changes with every run), so they would break that determinism.
"""
from __future__ import annotations

import csv
import html
import json
import math
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from pipeline.atomic import write_text
from pipeline.config import dig
from pipeline.paths import DATASETS, GAMEPLAY_FRAMES_MANIFEST, metrics_path

REPORTS = Path("reports")
INDEX = REPORTS / "index.html"
MISSING = "–"  # en dash: no value (no HEAD version, no git, key absent)

# Headline figures of metrics/evaluate-<ds>.json: (key, label, better, baselines as (key, label)).
HEADLINES: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("mse", "rollout MSE", "lower", (
        ("mse_copy_last", "copy-last"), ("mse_mean_frame", "mean frame"), ("mse_prior_only", "prior only"),
        ("mse_shuffled_actions", "deranged actions"), ("mse_sample", "sampled decode"),
        ("mse_tokenizer", "tokenizer ceiling"))),
    ("psnr", "rollout PSNR (dB)", "higher", (
        ("psnr_copy_last", "copy-last"), ("psnr_mean_frame", "mean frame"), ("psnr_prior_only", "prior only"),
        ("psnr_shuffled_actions", "deranged actions"), ("psnr_sample", "sampled decode"),
        ("psnr_tokenizer", "tokenizer ceiling"))),
    ("ssim", "rollout SSIM", "higher", (
        ("ssim_copy_last", "copy-last"), ("ssim_mean_frame", "mean frame"), ("ssim_prior_only", "prior only"),
        ("ssim_shuffled_actions", "deranged actions"), ("ssim_sample", "sampled decode"),
        ("ssim_tokenizer", "tokenizer ceiling"))),
    ("sharpness", "sharpness", "higher", (
        ("sharpness_copy_last_recon", "copy-last (reconstructed)"), ("sharpness_prior_only", "prior only"),
        ("sharpness_shuffled_actions", "deranged actions"), ("sharpness_sample", "sampled decode"),
        ("sharpness_tokenizer", "tokenizer ceiling"))),
    ("delta_psnr", "ΔPSNR (true vs deranged actions, dB)", "higher", ()),
    ("action_fidelity", "action fidelity (extractor on predictions)", "higher", (
        ("action_fidelity_deranged", "deranged actions"), ("action_fidelity_shuffled", "shuffled actions"))),
    ("world_action_fidelity", "world action fidelity", "higher", (
        ("world_action_fidelity_deranged", "deranged actions"), ("world_action_fidelity_prior_only", "prior only"),
        ("world_action_fidelity_sample", "sampled decode"), ("world_action_fidelity_truth", "true frames"))),
    ("nll", "policy NLL", "lower", (
        ("nll_repeat_last", "repeat-last"), ("nll_mlp", "MLP"), ("nll_marginal", "marginal"))),
    ("first_action_acc", "policy first-action accuracy", "higher", (
        ("first_action_acc_repeat_last", "repeat-last"), ("first_action_acc_mlp", "MLP"),
        ("first_action_acc_marginal", "marginal"))),
)

# Hand-built priors of the dynamics models: dotted params key -> what it does (stated under limits).
PRIORS = {
    "dynamics.mnist.masked.ego_copy":
        "each token may copy the last context frame moved by the actions (the tracked digit)",
    "dynamics.mnist.masked.motion_radius":
        "motion-copy head: tokens mix the head with the previous frame moved by a few tokens",
    "dynamics.gameplay.flow.residual": "each frame predicted as a correction of its predecessor (copy prior)",
    "dynamics.gameplay.flow.camera_warp": "that predecessor moved against the camera's motion under the action",
}

# The training stages whose metrics are shown, with their loss curves where one is logged.
TRAINING = ("tokenizer", "dynamics", "policy")
LOSS_PLOT = "dynamics"  # plots/<stage>-<ds>.json: rows {step, loss}
# The params.yaml sections the page shows (and its params deps): those some stage's outputs depend
# on; ``loader`` (how batches are read) and ``mlflow`` (where runs are logged) change no output.
PARAMS_SECTIONS = ("store", "mnist_digits", "moving_mnist", "gameplay_videos", "gameplay_frames", "actions",
                   "tokenizer", "latents", "dynamics", "policy", "evaluate")
GLOBAL_METRICS = ("moving_mnist", "gameplay_videos", "gameplay_frames")
PER_DATASET_METRICS = ("actions", "tokenizer", "latents", "dynamics", "policy", "evaluate")
TIMING_KEYS = ("train_seconds", "eval_seconds", "mlp_train_seconds", "seconds", "elapsed_s")


class ReportError(RuntimeError):
    """An input of the report is missing or malformed; the message names the file."""


# ---------------------------------------------------------------------------------------------------
# Inputs


def read_json(path: Path) -> Any:
    if not path.exists():
        raise ReportError(f"{path}: missing (the report reads it; run the stage that writes it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON: {exc}") from exc


def read_json_dict(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def git(root: Path, *args: str) -> str | None:
    """``git <args>`` in ``root``: its stdout, or None where git is missing or fails."""
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def head_json(root: Path, rel: Path) -> dict | None:
    """``rel`` as committed at HEAD (None: no git, no HEAD, not committed, not a JSON object)."""
    text = git(root, "show", f"HEAD:./{rel.as_posix()}")
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD's commit, whether the tracked or untracked tree differs from it); None where unknown."""
    commit = git(root, "rev-parse", "HEAD")
    status = git(root, "status", "--porcelain")
    return (commit.strip() if commit else None), (None if status is None else bool(status.strip()))


def params_sections(text: str, keep: tuple[str, ...] = PARAMS_SECTIONS) -> str:
    """The top-level sections ``keep`` of params.yaml's text, verbatim (comments included): a section
    runs from its key's line (with the comment lines right above it) to the next top-level key."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line[:1].isalpha() and ":" in line]
    out = []
    for n, i in enumerate(starts):
        key = lines[i].split(":", 1)[0].strip()
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        while end > i + 1 and n + 1 < len(starts) and lines[end - 1].startswith("#"):
            end -= 1  # the next section's comment
        begin = i
        while begin > 0 and lines[begin - 1].startswith("#"):
            begin -= 1
        if key in keep:
            out.extend(lines[begin:end])
    return "\n".join(out).strip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------
# Figures


def number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """A value as text, the same for the same value: 4 significant digits for floats."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return format(v, ".4g")
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def change(old: Any, new: Any) -> str:
    """The change from ``old`` (HEAD) to ``new`` (workspace), as ``dvc metrics diff`` gives it:
    ``+0.0012 (+2.7 %)``; ``MISSING`` where either side is not a number."""
    if not (number(old) and number(new)):
        return MISSING
    diff = new - old
    if diff == 0:
        return "0"
    text = format(diff, "+.4g")
    if old != 0 and math.isfinite(old):
        text += f" ({format(100 * diff / abs(old), '+.3g')} %)"
    return text


def with_ci(m: dict, key: str) -> str:
    """``value [low, high]`` where the metrics hold the key's 95 % interval, else the value."""
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    text = fmt(m.get(key))
    if number(lo) and number(hi):
        text += f" [{fmt(lo)}, {fmt(hi)}]"
    return text


# ---------------------------------------------------------------------------------------------------
# HTML


def e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def href(rel: str) -> str:
    """A relative URL (escaped for an attribute); refuses absolute paths, schemes and ``..``."""
    if rel.startswith(("/", "\\")) or ":" in rel or ".." in Path(rel).parts:
        raise ReportError(f"media path {rel!r} is not relative inside reports/")
    return e(quote(rel))


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table; ``header`` is text (escaped here), ``rows`` are cells already in HTML."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>\n" for r in rows)
    attr = f' class="{e(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>\n"


def kv_table(m: dict, skip: tuple[str, ...] = ()) -> str:
    """Scalars of a metrics dict as a two-column table (intervals beside their key)."""
    rows = []
    for k in sorted(m):
        v = m[k]
        if k in skip or k.endswith(("_ci_low", "_ci_high")) or isinstance(v, dict):
            continue
        if isinstance(v, list) and not all(number(x) for x in v):
            continue
        rows.append([e(k), e(with_ci(m, k))])
    return table(["metric", "value"], rows, "kv")


def summary_table(m: dict, old: dict | None) -> str:
    rows = []
    for key, label, better, baselines in HEADLINES:
        if key not in m:
            continue
        base = "<br>".join(f"{e(bl)}: {e(with_ci(m, bk))}" for bk, bl in baselines if bk in m) or MISSING
        rows.append([f"{e(label)}<br><code>{e(key)}</code>", e(with_ci(m, key)), e(better),
                     e(fmt(old.get(key)) if old else MISSING), e(change(old.get(key) if old else None, m[key])),
                     base])
    if not rows:
        return "<p>No headline figures in the metrics.</p>\n"
    return table(["metric", "model [95 % interval]", "better", "HEAD", "change vs HEAD", "baselines [95 % interval]"],
                 rows, "summary")


def loss_svg(rows: list[dict], title: str, width: int = 520, height: int = 220) -> str:
    """An inline SVG line plot of ``rows`` ({step, loss}); deterministic text for the same rows."""
    pts = sorted((r["step"], r["loss"]) for r in rows
                 if number(r.get("step")) and number(r.get("loss")) and math.isfinite(r["loss"]))
    if not pts:
        return "<p>No logged loss.</p>\n"
    ml, mr, mt, mb = 64, 12, 24, 36
    x0, x1 = pts[0][0], pts[-1][0]
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    xs = (x1 - x0) or 1
    ys = (y1 - y0) or 1

    def px(x: float) -> float:
        return ml + (x - x0) / xs * (width - ml - mr)

    def py(y: float) -> float:
        return height - mb - (y - y0) / ys * (height - mt - mb)

    poly = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
    dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2"/>' for x, y in pts)
    b, r = height - mb, width - mr
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="loss" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>'
        f'<text x="{width // 2}" y="16" text-anchor="middle">{e(title)}</text>'
        f'<line x1="{ml}" y1="{b}" x2="{r}" y2="{b}" stroke="#444"/>'
        f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{b}" stroke="#444"/>'
        f'<text x="{ml - 4}" y="{mt + 4}" text-anchor="end">{e(fmt(y1))}</text>'
        f'<text x="{ml - 4}" y="{b}" text-anchor="end">{e(fmt(y0))}</text>'
        f'<text x="{ml}" y="{b + 16}" text-anchor="middle">{e(fmt(x0))}</text>'
        f'<text x="{r}" y="{b + 16}" text-anchor="end">{e(fmt(x1))}</text>'
        f'<text x="{(ml + r) // 2}" y="{height - 4}" text-anchor="middle">step</text>'
        f'<text x="14" y="{(mt + b) // 2}" text-anchor="middle" transform="rotate(-90 14 {(mt + b) // 2})">loss</text>'
        f'<polyline fill="none" stroke="#c0392b" stroke-width="1.5" points="{poly}"/>'
        f'<g fill="#c0392b">{dots}</g></svg>\n'
    )


def confusion_table(conf: dict) -> str:
    """Rows: true action; columns: the extractor's; the diagonal marked."""
    if not isinstance(conf, dict) or not all(isinstance(v, dict) for v in conf.values()):
        return ""
    labels = sorted(set(conf) | {p for v in conf.values() for p in v})
    rows = []
    for t in labels:
        cells = [f"<th>{e(t)}</th>"]
        for p in labels:
            v = conf.get(t, {}).get(p, 0)
            cls = ' class="diag"' if p == t else ""
            cells.append(f"<td{cls}>{e(fmt(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>\n")
    head = "<tr><th>true \\ extracted</th>" + "".join(f"<th>{e(p)}</th>" for p in labels) + "</tr>"
    return f'<table class="confusion"><thead>{head}</thead>\n<tbody>\n{"".join(rows)}</tbody></table>\n'


def media_section(root: Path, ds: str) -> str:
    """The per-horizon plots, contact sheet, rollouts and imagined episodes of ``reports/<ds>/``."""
    index_path = root / REPORTS / ds / "media.json"
    index = read_json_dict(index_path)

    def src(name: Any) -> str:
        if not isinstance(name, str):
            raise ReportError(f"{index_path}: media entry {name!r} is not a file name")
        if not (root / REPORTS / ds / name).is_file():
            raise ReportError(f"{root / REPORTS / ds / name}: listed in {index_path} but missing")
        return href(f"{ds}/{name}")

    out = []
    plots = index.get("plots") or {}
    if plots:
        out.append("<h3>Per-horizon plots (test split)</h3>\n<div class=\"grid\">\n")
        for name in sorted(plots):
            out.append(f'<figure><img src="{src(plots[name])}" alt="{e(ds)} {e(name)} per horizon" width="600" '
                       f'height="400"><figcaption>{e(name)}</figcaption></figure>\n')
        out.append("</div>\n")
    if index.get("contact_sheet"):
        out.append(f'<h3>Contact sheet</h3>\n<img class="wide" src="{src(index["contact_sheet"])}" '
                   f'alt="{e(ds)} contact sheet">\n')
    rollouts = index.get("rollouts") or []
    if rollouts:
        out.append("<h3>Side-by-side rollouts (test windows)</h3>\n<div class=\"grid\">\n")
        for files in rollouts:
            files = [files] if isinstance(files, str) else list(files)
            gif = next((f for f in files if str(f).endswith(".gif")), None)
            mp4 = next((f for f in files if str(f).endswith(".mp4")), None)
            out.append("<figure>")
            if mp4:
                out.append(f'<video src="{src(mp4)}" controls muted loop autoplay playsinline preload="auto">'
                           f'</video>')
            elif gif:
                out.append(f'<img src="{src(gif)}" alt="{e(ds)} rollout {e(gif)}">')
            names = " · ".join(f'<a href="{src(f)}">{e(f)}</a>' for f in files)
            out.append(f"<figcaption>{names}</figcaption></figure>\n")
        out.append("</div>\n")
    imagined = index.get("imagined") or []
    if imagined:
        out.append("<h3>The policy's imagined episodes</h3>\n<div class=\"grid\">\n")
        for f in imagined:
            out.append(f'<figure><img src="{src(f)}" alt="{e(ds)} imagined {e(f)}"><figcaption>{e(f)}</figcaption>'
                       f"</figure>\n")
        out.append("</div>\n")
    return "".join(out)


def videos_section(root: Path) -> str:
    """The gameplay videos: counts, then every failure with its reason, then the manifest."""
    out = []
    vm = read_json_dict(root / metrics_path("gameplay_videos"))
    fm = read_json_dict(root / metrics_path("gameplay_frames"))
    out.append(f"<p>Videos downloaded: {e(fmt(vm.get('videos_ok')))} ok, {e(fmt(vm.get('videos_failed')))} failed "
               f"({e(fmt(vm.get('duration_s')))} s of video, {e(fmt(vm.get('bytes')))} bytes). "
               f"Decoded into frames: {e(fmt(fm.get('videos_ok')))} ok, {e(fmt(fm.get('videos_failed')))} failed; "
               f"{e(fmt(fm.get('episodes')))} episodes, {e(fmt(fm.get('frames')))} frames.</p>\n")
    path = root / GAMEPLAY_FRAMES_MANIFEST
    if not path.exists():
        raise ReportError(f"{path}: missing (the report reads it; run the gameplay_frames stage)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        out.append("<p>Failed videos and their reasons:</p>\n")
        out.append(table(["video", "source", "status", "reason"],
                         [[e(r.get("name")), e(r.get("source")), e(r.get("status")), e(r.get("error"))]
                          for r in failed], "failed"))
    else:
        out.append("<p>No video failed.</p>\n")
    cols = ["name", "source", "status", "error", "duration", "frames", "bytes"]
    out.append(f"<details><summary>frames_manifest.csv ({len(rows)} videos)</summary>\n")
    out.append(table(cols, [[e(r.get(c, "")) for c in cols] for r in rows], "manifest"))
    out.append("</details>\n")
    return "".join(out)


def data_section(root: Path, ds: str) -> str:
    out = ["<h3>Data</h3>\n"]
    if ds == "gameplay":
        out.append(videos_section(root))
    else:
        mm = read_json_dict(root / metrics_path("moving_mnist"))
        out.append(f"<p>{e(fmt(mm.get('episodes')))} episodes, {e(fmt(mm.get('frames')))} frames; source: "
                   f"{e(fmt(mm.get('source')))}.</p>\n")
    am = read_json_dict(root / metrics_path("actions", ds))
    out.append(f"<h3>Actions (extractor <code>{e(am.get('method', MISSING))}</code>)</h3>\n")
    if "confusion" in am:
        out.append("<p>Confusion matrix of the extracted actions against the true ones:</p>\n")
        out.append(confusion_table(am["confusion"]))
    out.append(kv_table(am, skip=("confusion",)))
    return "".join(out)


def training_section(root: Path, ds: str) -> str:
    out = ["<h3>Training</h3>\n"]
    plot = root / "plots" / f"{LOSS_PLOT}-{ds}.json"
    rows = read_json(plot)
    if not isinstance(rows, list):
        raise ReportError(f"{plot}: expected a JSON list of {{step, loss}} rows")
    out.append(loss_svg([r for r in rows if isinstance(r, dict)], f"{LOSS_PLOT} training loss ({ds})"))
    out.append("<p>The tokenizer and the policy log no loss curve; their final losses are in their tables.</p>\n")
    out.append('<div class="grid">\n')
    for stage in TRAINING[1:]:  # the tokenizer has its own section
        m = read_json_dict(root / metrics_path(stage, ds))
        out.append(f"<div><h4>{e(stage)}</h4>\n{kv_table(m)}</div>\n")
    out.append("</div>\n")
    return "".join(out)


def metrics_files() -> list[Path]:
    """Every metrics file the page reads (the stage's metrics deps in dvc.yaml)."""
    files = [metrics_path(s) for s in GLOBAL_METRICS]
    files += [metrics_path(s, ds) for s in PER_DATASET_METRICS for ds in DATASETS]
    return sorted(files)


def inputs() -> list[Path]:
    """Every file and directory the page reads besides params.yaml: the stage's data deps in dvc.yaml."""
    return sorted([*metrics_files(), *(Path("plots") / f"{LOSS_PLOT}-{ds}.json" for ds in DATASETS),
                   GAMEPLAY_FRAMES_MANIFEST, *(REPORTS / ds for ds in DATASETS)])


def timings(root: Path) -> list[list[str]]:
    """Each metrics file's run-time figures (``*_seconds``, ``elapsed_s``): rows of (file, key, seconds)."""
    rows = []
    for rel in metrics_files():
        path = root / rel
        m = read_json_dict(path)
        for k in sorted(m):
            if (k in TIMING_KEYS or k.endswith("_seconds")) and number(m[k]):
                rows.append([e(path.stem), e(k), e(format(m[k], ".1f"))])
    return rows


def limits_section(root: Path, params: dict, evals: dict[str, dict]) -> str:
    items = []
    for ds, m in evals.items():
        if m.get("lpips") == "n/a" or "lpips_reason" in m:
            items.append(f"<li>LPIPS ({e(ds)}): n/a — {e(m.get('lpips_reason', 'no reason given'))}</li>")
    sizes = []
    for ds in evals:
        for stage in TRAINING:
            m = read_json_dict(root / metrics_path(stage, ds))
            if m.get("n_params") == 0:
                sizes.append(f"{e(stage)}@{e(ds)}: {e(m.get('kind', 'no'))} (nothing trained)")
            elif number(m.get("n_params")):
                sizes.append(f"{e(stage)}@{e(ds)}: {e(fmt(m['n_params']))} parameters, "
                             f"{e(fmt(m.get('train_steps')))} steps")
    items.append("<li>CPU-sized models, trained for minutes, not a paper's scale: " + "; ".join(sizes) + ".</li>")
    priors = []
    for key, what in PRIORS.items():
        v = dig(params, key)
        ds = key.split(".")[1]
        family = dig(params, f"dynamics.{ds}.family")
        if v is None or family != key.split(".")[2]:
            continue
        on = bool(v)
        priors.append(f"<li><code>{e(key)}</code> = {e(fmt(v))} ({'on' if on else 'off'}): {e(what)}</li>")
    items.append("<li>Hand-built priors of the dynamics models:<ul>" + ("".join(priors) or "<li>none</li>")
                 + "</ul></li>")
    items.append("<li>Change vs HEAD compares the workspace's metrics with the committed ones; HEAD is not a "
                 "DVC input of this stage, so the page is rebuilt only when its inputs change.</li>")
    return "<ul>" + "\n".join(items) + "</ul>\n"


CSS = """
body{font-family:sans-serif;margin:1.5em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;font-size:13px}
thead th{background:#eee}
td.diag{background:#dfd;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0}
figcaption{font-size:12px;color:#555}
img.wide{max-width:100%}
pre{background:#f6f6f6;padding:.5em;overflow:auto;font-size:12px}
section.ds{border-top:2px solid #888;margin-top:2em}
"""


def build(root: Path = Path(".")) -> str:
    """The page's HTML for the outputs under ``root`` (the repository root)."""
    root = Path(root)
    params_file = root / "params.yaml"
    if not params_file.exists():
        raise ReportError(f"{params_file}: missing")
    params_text = params_file.read_text()
    params = yaml.safe_load(params_text) or {}
    evals = {ds: read_json_dict(root / metrics_path("evaluate", ds)) for ds in DATASETS}
    commit, dirty = git_state(root)
    toc = " · ".join(f'<a href="#{e(ds)}">{e(ds)}</a>' for ds in DATASETS)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<title>World model pipeline: report</title>\n",
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>World model pipeline: report</h1>\n",
        f"<p>Datasets: {toc} · <a href=\"#provenance\">what made it</a> · <a href=\"#limits\">limits</a></p>\n",
    ]
    for ds in DATASETS:
        m = evals[ds]
        old = head_json(root, metrics_path("evaluate", ds))
        parts.append(f'<section class="ds" id="{e(ds)}">\n<h2>{e(ds)}</h2>\n')
        parts.append(f"<p>Dynamics family <code>{e(m.get('family', MISSING))}</code>; "
                     f"{e(fmt(m.get('test_windows')))} test windows from {e(fmt(m.get('test_episodes')))} test "
                     f"episodes; {e(fmt(m.get('context_frames')))} context frames, horizon {e(fmt(m.get('horizon')))}. "
                     f"Intervals: per-episode bootstrap 95 %. HEAD: "
                     f"{'the committed metrics' if old else 'no committed metrics (' + MISSING + ')'}.</p>\n")
        parts.append("<h3>Summary (test split)</h3>\n")
        parts.append(summary_table(m, old))
        parts.append(media_section(root, ds))
        parts.append(data_section(root, ds))
        parts.append(f"<h3>Tokenizer</h3>\n{kv_table(read_json_dict(root / metrics_path('tokenizer', ds)))}")
        parts.append(training_section(root, ds))
        parts.append(f"<details><summary>All evaluate-{e(ds)} figures</summary>\n{kv_table(m)}</details>\n")
        parts.append("</section>\n")
    state = (MISSING if commit is None else commit) + (
        "" if dirty is None else (" (working tree dirty)" if dirty else " (working tree clean)"))
    parts.append('<section id="provenance">\n<h2>What made it</h2>\n')
    parts.append(f'<p class="commit">Git commit: <code>{e(state)}</code></p>\n')
    parts.append("<h3>Run times (seconds, from the metrics)</h3>\n")
    parts.append(table(["metrics file", "key", "seconds"], timings(root), "timings"))
    parts.append(f"<details><summary>params.yaml (the sections outputs depend on: all but loader and mlflow)"
                 f"</summary>\n<pre>{e(params_sections(params_text))}</pre></details>\n</section>\n")
    parts.append(f'<section id="limits">\n<h2>Limits</h2>\n{limits_section(root, params, evals)}</section>\n')
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def run(root: Path = Path(".")) -> Path:
    """Write ``reports/index.html`` under ``root`` atomically; returns its path."""
    out = Path(root) / INDEX
    write_text(out, build(root))
    return out
