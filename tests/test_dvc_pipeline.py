"""`dvc repro` of the real DAG in a temporary git repository, with the real params shrunk.

Covers: a full repro of the data stages, a no-op repro that runs nothing, a param change that
reruns exactly the stage whose params it touches (not restored from the run cache), byte-identical
outputs from a forced rerun as on another CPU (the md5s DVC records in dvc.lock), and `dvc metrics show`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline.test_video import FFMPEG_C_ONLY, OTHER_CPU_ENV

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# The real params, shrunk (lightning-hydra-template style): only sizes change.
SHRINK = {
    "store": {"chunk_frames": 16, "shard_chunks": 4},
    "loader": {"num_workers": 0},
    "moving_mnist": {"num_sequences": 6, "seq_len": 10},
    "gameplay_videos": {"crafter": {"episodes": 2, "steps": 40}},
    "tokenizer": {"mnist": {"eval": {"max_frames": 32, "probe_frames": 16, "batch_size": 16}}},
    "latents": {"batch_frames": 32},
}
DATA_STAGES = ["mnist_digits", "moving_mnist", "gameplay_videos", "gameplay_frames", "actions@mnist", "actions@gameplay"]
STAGES = [*DATA_STAGES, "tokenizer@mnist", "latents@mnist"]


def deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def shrunk_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return deep_update(params, SHRINK)


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran_stages(output: str) -> list[str]:
    return sorted(
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    )


def lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        f"{stage}:{out['path']}": out["md5"]
        for stage, body in lock["stages"].items()
        for out in body.get("outs", [])
        if out["path"].startswith("data/")  # metrics files hold timings; the data must not differ
    }


def make_repo(repo: Path, params: dict, **env: str) -> dict:
    """A git + DVC repository at ``repo`` with the project's code, DAG and ``params``; returns the
    environment its commands run in (this venv, MLflow in the repository, plus ``env``)."""
    for name in ("pipeline", "stages", "models"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/data/\n/mlflow.db\n__pycache__/\n")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "PYTHONPATH": str(repo),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
        **env,
    }
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run(cmd, repo, env)
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("dvcrepo")
    return repo, make_repo(repo, shrunk_params())


@pytest.fixture(scope="module")
def first_repro(repo):
    """The data stages through the Prefect DAG runner at concurrency 2 (independent branches in
    parallel, each stage a `dvc repro` that waits for DVC's repository lock), then the rest."""
    path, env = repo
    dag = run([sys.executable, "-m", "pipeline.dag", "--concurrency", "2", *DATA_STAGES], path, env)
    assert all(f"ok       {s}" in dag.stdout for s in DATA_STAGES), dag.stdout
    proc = run(["dvc", "repro", *STAGES], path, env)
    proc.stdout = dag.stdout + proc.stdout
    return proc


def test_repro_builds_data_stages(repo, first_repro):
    path, env = repo
    assert set(STAGES) - set(DATA_STAGES) <= set(ran_stages(first_repro.stdout)), first_repro.stdout
    out = run(["dvc", "status", *DATA_STAGES], path, env)
    assert "up to date" in out.stdout, out.stdout
    for out in ["data/mnist/digits.zarr", "data/mnist/frames.zarr", "data/gameplay/frames.zarr",
                "data/mnist/actions.zarr", "data/gameplay/actions.zarr", "data/mnist/latents.zarr"]:
        assert (path / out / "zarr.json").exists(), out
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], path, env).stdout)
    flat = json.dumps(metrics)
    for key in ("accuracy", "ambiguous", "tracker_mae", "videos_ok", "videos_failed", "frames", "episodes",
                "psnr", "ssim", "psnr_mean_image", "collapsed", "frames_per_s"):
        assert f'"{key}"' in flat, f"metric {key} missing from dvc metrics show"


def test_noop_repro_runs_nothing(repo, first_repro):
    path, env = repo
    proc = run(["dvc", "repro", *STAGES], path, env)
    assert ran_stages(proc.stdout) == [], proc.stdout


def test_param_change_reruns_only_that_stage(repo, first_repro):
    path, env = repo
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["actions"]["gameplay"]["move_threshold"] = 0.45  # a value never run before
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = (path / "data/gameplay/actions.zarr/zarr.json").stat().st_mtime_ns
    proc = run(["dvc", "repro", *STAGES], path, env)
    assert ran_stages(proc.stdout) == ["actions@gameplay"], proc.stdout
    assert "run-cache" not in proc.stdout
    assert (path / "data/gameplay/actions.zarr/zarr.json").stat().st_mtime_ns != before, "stage really reran"
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert lock["stages"]["actions@gameplay"]["params"]["params.yaml"]["actions.gameplay"]["move_threshold"] == 0.45


def test_forced_rerun_on_other_cpu_code_is_byte_identical(repo, first_repro, tmp_path):
    """Guards issue 18: the data outputs (videos, frame stores, actions, quantize latents) are the
    same bytes on every machine. A forced rerun as on another CPU (FFmpeg's C code, through a
    sitecustomize every stage's Python runs; NumPy, ATen and glibc without AVX and up) must record
    the md5s of the first run."""
    path, env = repo
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        FFMPEG_C_ONLY + f"open({str(site / 'ran')!r}, 'a').write('x')\n"
    )
    other_cpu = {**env, **OTHER_CPU_ENV, "PYTHONPATH": f"{site}{os.pathsep}{env['PYTHONPATH']}"}
    before = lock_outs(path)
    tokenizer = path / "data/mnist/tokenizer/tokenizer.json"
    scores = json.loads(tokenizer.read_text())["metrics"]
    proc = run(["dvc", "repro", "-f", *STAGES], path, other_cpu)
    assert set(ran_stages(proc.stdout)) == set(STAGES), proc.stdout
    assert len((site / "ran").read_text()) > len(STAGES), "the stages did not run as on another CPU"
    after = lock_outs(path)
    # The tokenizer's directory is a model's: it records its evaluation (PSNR, SSIM in floats that
    # ATen's kernels round differently on other CPU code), so it is close, not the same bytes.
    model = "tokenizer@mnist:data/mnist/tokenizer"
    changed = {k for k in before if before[k] != after.get(k) and k != model}
    assert not changed, f"data outputs differ between two runs with the same params on other CPU code: {sorted(changed)}"
    again = json.loads(tokenizer.read_text())["metrics"]
    for key, value in scores.items():
        if isinstance(value, float):
            assert again[key] == pytest.approx(value, rel=1e-4), key
        else:
            assert again[key] == value, key


def test_deps_rerun_exactly_what_they_touch(repo, first_repro):
    """Both directions: a param no stage output depends on (`loader.num_workers`) reruns nothing;
    a change to code one stage family runs (pipeline/motion.py) reruns exactly those stages."""
    path, env = repo
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["loader"]["num_workers"] = 1
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run(["dvc", "repro", *STAGES], path, env)
    assert ran_stages(proc.stdout) == [], proc.stdout
    motion = path / "pipeline" / "motion.py"
    motion.write_text(motion.read_text() + "\n# a comment: the code changed\n")
    proc = run(["dvc", "repro", *STAGES], path, env)
    assert ran_stages(proc.stdout) == ["actions@gameplay", "actions@mnist"], proc.stdout
