"""The report stage: ``reports/index.html`` from a real run's metrics (``tests/data/report/``, copied
from a full ``dvc repro``) and small media made by ``pipeline.media``, checked in headless Chromium
(every image and video decodes, no console error, no request leaves ``reports/``), and its parts that
can fail: the change against HEAD, escaping, missing inputs named, dvc.yaml's deps and params."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import media
from pipeline.paths import DATASETS
from pipeline.report import INDEX, MISSING, PARAMS_SECTIONS, ReportError, build, change, inputs, params_sections, run
from tests.browser import MISSING as NO_CHROMIUM
from tests.browser import find_chromium, open_page

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "data" / "report"
XSS = "<script>alert(1)</script> & \"quoted\""


def write_media(out: Path, ds: str) -> None:
    """reports/<ds>/ as the evaluate stage writes it, tiny: plots, contact sheet, a rollout as GIF and
    MP4, an imagined episode, and media.json."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = rng.random((6, 8, 8, 1))
    model = np.clip(truth + 0.1 * rng.standard_normal(truth.shape), 0, 1)
    frames = media.side_by_side([("truth", truth), ("model", model)], context=2, scale=2, title=f"{ds} window 1")
    media.write_gif(frames, out / "rollout_00.gif", fps=4)
    media.write_mp4(frames, out / "rollout_00.mp4", fps=4)
    media.write_png(media.contact_sheet([("truth", truth), ("model", model)], 2, [1, 2]), out / "contact_sheet.png")
    rows = [{"horizon": h, "mse": 0.01 * h, "mse_copy_last": 0.02 * h} for h in (1, 2, 3, 4)]
    media.horizon_plot(rows, ["mse", "mse_copy_last"], out / "mse.png", f"{ds}: mse", "MSE")
    media.write_gif(media.imagined_frames(model, 2, 2), out / "imagined_00.gif", fps=4)
    index = {"contact_sheet": "contact_sheet.png", "imagined": ["imagined_00.gif"], "plots": {"mse": "mse.png"},
             "rollouts": [["rollout_00.gif", "rollout_00.mp4"]]}
    (out / "media.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("media")
    for ds in DATASETS:
        write_media(base / ds, ds)
    return base


@pytest.fixture
def root(tmp_path, media_dirs) -> Path:
    """A repository root holding exactly the report's declared inputs (and a failed video with a
    hostile reason)."""
    for rel in inputs():
        if rel.parts[0] == "reports":
            shutil.copytree(media_dirs / rel.name, tmp_path / rel)
        else:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(FIXTURE / rel, tmp_path / rel)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    manifest = tmp_path / "data" / "gameplay" / "frames_manifest.csv"
    lines = manifest.read_text().splitlines()
    lines.append(f'broken_001,crafter,failed,"{XSS.replace(chr(34), chr(34) * 2)}",,0,0,')
    manifest.write_text("\n".join(lines) + "\n")
    return tmp_path


def git(root: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)


# ---------------------------------------------------------------------------------------------------
# The page in a browser


def test_page_loads_offline_in_chromium(root, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.fail(NO_CHROMIUM)  # never skipped: CI installs it with scripts/setup.sh
    page = run(root)
    assert page == root / INDEX
    reports = (root / "reports").resolve()
    res = open_page(page.resolve().as_uri(), exe)
    shot = tmp_path / "report.png"
    shot.write_bytes(res.screenshot)
    print(f"screenshot: {shot}")
    assert res.screenshot.startswith(b"\x89PNG")
    assert not res.errors, res.errors
    assert res.requests and res.requests[0] == page.resolve().as_uri()
    for url in res.requests + res.links:
        if url.startswith("data:"):  # the browser's own video-control icons: nothing is fetched
            continue
        assert url.startswith("file://"), f"a request leaves the file system: {url}"
        assert Path(url.removeprefix("file://")).resolve().is_relative_to(reports), f"outside reports/: {url}"
    # 2 datasets x (1 plot + contact sheet + imagined); each rollout has an MP4, shown as <video>
    assert len(res.imgs) == 3 * len(DATASETS), res.imgs
    assert all(i["width"] > 0 for i in res.imgs), [i for i in res.imgs if not i["width"]]
    assert len(res.videos) == len(DATASETS), res.videos
    assert all(v["width"] > 0 and v["error"] is None for v in res.videos), res.videos


# ---------------------------------------------------------------------------------------------------
# Its parts


def test_sections_and_escaping(root, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(root.parent))  # no repository above tmp_path counts
    html = build(root)
    for text in ("Summary (test split)", "Per-horizon plots", "Contact sheet", "Side-by-side rollouts",
                 "imagined episodes", "Confusion matrix", "Failed videos and their reasons", "Tokenizer",
                 "dynamics training loss (mnist)", "<svg", "params.yaml", "Run times", "Limits",
                 "dynamics.gameplay.flow.camera_warp", "dynamics.mnist.masked.ego_copy", "LPIPS (gameplay): n/a"):
        assert text in html, text
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html.split("<pre>")[0]  # params.yaml's URLs are text, nothing else is
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot;" in html
    assert f'<code>{MISSING}</code>' in html  # no git: the commit is unknown
    assert 'src="mnist/rollout_00.mp4"' in html and 'src="gameplay/mse.png"' in html


def test_same_inputs_same_bytes(root):
    assert build(root) == build(root)


def test_change_vs_head_like_dvc_metrics_diff():
    assert change(1.0, 1.5) == "+0.5 (+50 %)"
    assert change(2.0, 1.0) == "-1 (-50 %)"
    assert change(0, 0.25) == "+0.25"
    assert change(3.0, 3.0) == "0"
    assert change(None, 1.0) == MISSING
    assert change("n/a", 1.0) == MISSING
    assert change(True, 1.0) == MISSING


def test_change_against_the_committed_metrics(root, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(root.parent))
    rel = Path("metrics") / "evaluate-mnist.json"
    git(root, "init", "-q")
    assert "no committed metrics" in build(root)  # a repository without HEAD
    git(root, "add", "-A")
    git(root, "commit", "-qm", "run")
    m = json.loads((root / rel).read_text())
    old = m["mse"]
    m["mse"] = old * 1.5
    (root / rel).write_text(json.dumps(m))
    html = build(root)
    mnist = html.split('<section class="ds" id="mnist">')[1].split("</section>")[0]
    row = mnist.split("<code>mse</code>")[1].split("</tr>")[0]
    assert f"<td>{format(old, '.4g')}</td>" in row and "(+50 %)" in row
    gameplay = html.split('<section class="ds" id="gameplay">')[1].split("</section>")[0]
    assert "<td>0</td>" in gameplay.split("<code>mse</code>")[1].split("</tr>")[0]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert f"{commit} (working tree dirty)" in html


@pytest.mark.parametrize("rel", ["metrics/actions-gameplay.json", "plots/dynamics-mnist.json",
                                 "data/gameplay/frames_manifest.csv", "reports/mnist/media.json"])
def test_a_missing_input_is_named(root, rel):
    (root / rel).unlink()
    with pytest.raises(ReportError, match=rel.split("/")[-1]):
        run(root)
    assert not (root / INDEX).exists()


def test_missing_media_file_and_escaping_paths_are_refused(root):
    (root / "reports" / "gameplay" / "imagined_00.gif").unlink()
    with pytest.raises(ReportError, match="imagined_00.gif"):
        build(root)
    index = root / "reports" / "mnist" / "media.json"
    m = json.loads(index.read_text())
    m["contact_sheet"] = "../../params.yaml"
    index.write_text(json.dumps(m))
    with pytest.raises(ReportError):
        build(root)


def test_dvc_yaml_declares_what_the_page_reads():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    data_deps = {d for d in stage["deps"] if not d.endswith(".py")}
    assert data_deps == {str(p) for p in inputs()}
    # the page shows the params sections some other stage depends on, and depends on exactly those
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    used = {p.split(".")[0] for name, body in stages.items() if name != "report"
            for p in body.get("do", body).get("params", [])}
    assert set(stage["params"]) == used == set(PARAMS_SECTIONS)
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
    assert outs == ["reports/index.html"]
    ignored = (ROOT / "reports" / ".gitignore").read_text().split()
    assert {"/index.html", *(f"/{ds}" for ds in DATASETS)} <= set(ignored)


def test_params_sections_keep_their_comments_and_drop_the_others():
    text = ("# preamble\nloader:\n  num_workers: 2   # how batches are read\n# about store\nstore:\n  chunk: 4\n"
            "mlflow:\n  uri: x\n# the dynamics\ndynamics:\n  steps: 3\n")
    assert params_sections(text, ("store", "dynamics")) == (
        "# about store\nstore:\n  chunk: 4\n# the dynamics\ndynamics:\n  steps: 3\n")
    shown = params_sections((ROOT / "params.yaml").read_text())
    assert set(yaml.safe_load(shown)) == set(PARAMS_SECTIONS)


def test_the_browser_check_sees_failures(tmp_path):
    """The checker itself can fail: a missing image, a network URL, a broken video and a console error."""
    exe = find_chromium()
    if exe is None:
        pytest.fail(NO_CHROMIUM)
    page = tmp_path / "reports" / "index.html"
    page.parent.mkdir()
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png"><img src="https://example.invalid/x.png">'
                    '<video src="nope.mp4"></video><script>console.error("boom")</script></body></html>')
    res = open_page(page.as_uri(), exe)
    assert "https://example.invalid/x.png" in res.requests
    assert [i["width"] for i in res.imgs] == [0, 0]
    assert res.videos[0]["width"] == 0 and res.videos[0]["error"]
    assert any("boom" in err for err in res.errors) and any("missing.png" in err for err in res.errors)


def test_main_logs_every_metric_and_the_page_to_the_parent_run(root, monkeypatch):
    """Issue 20: `report` logs every metric, and the page with its media, to the pipeline state's
    parent run (which holds params.yaml flattened); its own run is nested under that parent."""
    import mlflow

    from stages import report as stage

    monkeypatch.chdir(root)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(root.parent))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    stage.main()
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("world-models").experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.parent") == "true"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    (own,) = [r for r in runs if r.info.run_name == "report"]
    assert own.data.tags["mlflow.parentRunId"] == parent.info.run_id
    evaluate = json.loads((root / "metrics/evaluate-mnist.json").read_text())
    assert parent.data.metrics["evaluate-mnist.mse"] == pytest.approx(evaluate["mse"])
    assert parent.data.metrics["evaluate-mnist.val.mse"] == pytest.approx(evaluate["val"]["mse"])
    assert "dynamics-gameplay.final_loss" in parent.data.metrics
    assert parent.data.params["evaluate.mnist.horizon"] == str(
        yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["mnist"]["horizon"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/index.html", "report/mnist", "report/gameplay"} <= logged, logged
    media = {a.path for a in client.list_artifacts(parent.info.run_id, "report/mnist")}
    assert "report/mnist/media.json" in media
