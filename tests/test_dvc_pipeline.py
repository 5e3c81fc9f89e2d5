"""`dvc repro` of the real DAG in a temporary git repository, with the real params shrunk.

Covers: a full repro of the data stages and MNIST's model stages (tokenizer, latents, dynamics,
policy, evaluate), a no-op repro that runs nothing, a param change that reruns exactly the stage
whose params it touches (not restored from the run cache), an evaluation param that reruns
`evaluate` only, byte-identical data outputs from a forced rerun as on another CPU (the md5s DVC
records in dvc.lock), `dvc metrics show`, and the MLflow tree (one parent run per pipeline state,
a stage run nested under it per stage that ran; a `dvc exp run` gets a parent of its own).
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
    "moving_mnist": {"num_sequences": 8, "seq_len": 10},
    "gameplay_videos": {"crafter": {"episodes": 2, "steps": 40}},
    "tokenizer": {"mnist": {"eval": {"val_fraction": 0.25, "max_frames": 32, "probe_frames": 16, "batch_size": 16}}},
    "latents": {"batch_frames": 32},
    "dynamics": {"mnist": {"window": 5, "max_frames": 6,
                           "masked": {"dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "sample_steps": 2},
                           "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "log_every": 2, "ckpt_every": 2}}},
    "policy": {"mnist": {"state_frames": 2, "horizon": 2,
                         "model": {"dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "past_actions": 1},
                         "mlp": {"hidden": 16, "layers": 1, "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1}},
                         "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1}}},
    "evaluate": {"mnist": {"context_frames": 3, "horizon": 3, "bootstrap": 20, "speed_frames": 2,
                           "media": {"windows": 1, "scale": 1, "contact_horizons": [1, 2], "imagined": 1},
                           "policy": {"max_windows": 16, "mask_levels": [0.5], "nelbo_points": 2,
                                      "imagination_sequences": 2, "imagination_batch_size": 2}}},
}
DATA_STAGES = ["mnist_digits", "moving_mnist", "gameplay_videos", "gameplay_frames", "actions@mnist", "actions@gameplay"]
BYTE_STAGES = [*DATA_STAGES, "tokenizer@mnist", "latents@mnist"]   # the same bytes on any machine
STAGES = [*BYTE_STAGES, "dynamics@mnist", "policy@mnist", "evaluate@mnist"]


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
    (repo / ".gitignore").write_text("/data/\n/mlflow.db\n/mlflow.db.lock\n/mlartifacts/\n/mlruns/\n__pycache__/\n/checkpoints/\n")
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
                "psnr", "ssim", "psnr_mean_image", "collapsed", "frames_per_s", "final_loss", "steps_per_s",
                # the evaluate stage's contract keys (shared/reference/contract.md)
                "mse", "mse_copy_last", "mse_mean_frame", "mse_prior_only", "mse_shuffled_actions", "psnr_tokenizer",
                "sharpness", "mse_sample", "sharpness_sample", "imagine_fps", "nll", "nll_marginal",
                "first_action_acc", "first_action_acc_marginal", "first_action_acc_repeat_last",
                "first_action_acc_mlp", "action_fidelity", "action_fidelity_shuffled", "action_fidelity_deranged"):
        assert f'"{key}"' in flat, f"metric {key} missing from dvc metrics show"
    # the evaluate stage's per-horizon rows, pictures and videos
    rows = json.loads((path / "plots/evaluate-mnist.json").read_text())
    assert [r["horizon"] for r in rows] == [1, 2, 3]
    media = json.loads((path / "reports/mnist/media.json").read_text())
    for name in [*media["rollouts"][0], media["contact_sheet"], *media["plots"].values(), *media["imagined"]]:
        assert (path / "reports/mnist" / name).stat().st_size > 0, name
    show = run(["dvc", "plots", "show", "--json"], path, env)
    assert "plots/evaluate-mnist.json" in show.stdout


def mlflow_tree(path: Path) -> dict[str, tuple[dict, list[str]]]:
    """The repository's MLflow runs as ``{parent run name: (parent tags, [stage run names])}``."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(yaml.safe_load((path / "params.yaml").read_text())["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in runs if "pipeline.key" in r.data.tags}
    tree = {p.info.run_name: (p.data.tags, []) for p in parents.values()}
    for r in runs:
        if r.info.run_id not in parents:
            tree[parents[r.data.tags["mlflow.parentRunId"]].info.run_name][1].append(r.info.run_name)
    return {name: (tags, sorted(children)) for name, (tags, children) in tree.items()}


def test_mlflow_tree_one_parent_per_pipeline_state(repo, first_repro):
    """Issue 20: the repro's stage runs nest under one parent (its commit and params); a `dvc exp
    run` makes a parent of its own, named after the experiment, holding the stages it ran. Runs
    right after the first repro, before the tests below change params (the experiment's outputs
    stay in the workspace: the later tests' repros start from them)."""
    path, env = repo
    (name, (tags, children)), = mlflow_tree(path).items()
    assert name.startswith("pipeline@") and tags["git_commit"] in tags["pipeline.key"]
    assert children == sorted(STAGES)
    proc = run(["dvc", "exp", "run", "-n", "boot23", "-S", "evaluate.mnist.bootstrap=23", "evaluate@mnist"], path, env)
    assert ran_stages(proc.stdout) == ["evaluate@mnist"], proc.stdout
    tree = mlflow_tree(path)
    assert set(tree) == {name, "boot23"} and tree[name][1] == sorted(STAGES)
    tags, children = tree["boot23"]
    assert children == ["evaluate@mnist"] and tags["dvc.exp_name"] == "boot23"
    assert tags["params_hash"] != tree[name][0]["params_hash"]


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


def test_evaluation_param_reruns_only_evaluate(repo, first_repro):
    """Training and evaluation apart: an evaluation param (here the bootstrap resamples) reruns
    `evaluate@mnist` and nothing upstream; its metrics are rewritten."""
    path, env = repo
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["evaluate"]["mnist"]["bootstrap"] = 21  # a value never run before
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    metrics = path / "metrics/evaluate-mnist.json"
    before = metrics.stat().st_mtime_ns
    proc = run(["dvc", "repro", *STAGES], path, env)
    assert ran_stages(proc.stdout) == ["evaluate@mnist"], proc.stdout
    assert metrics.stat().st_mtime_ns != before, "stage really reran"
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert lock["stages"]["evaluate@mnist"]["params"]["params.yaml"]["evaluate.mnist"]["bootstrap"] == 21


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
    # evaluate@mnist runs the actions stage's extractor on predicted frames; its data came out the same
    assert ran_stages(proc.stdout) == ["actions@gameplay", "actions@mnist", "evaluate@mnist"], proc.stdout


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
    proc = run(["dvc", "repro", "-f", *BYTE_STAGES], path, other_cpu)
    assert set(ran_stages(proc.stdout)) == set(BYTE_STAGES), proc.stdout
    assert len((site / "ran").read_text()) > len(BYTE_STAGES), "the stages did not run as on another CPU"
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


