"""The shipped params.yaml survives `dvc exp run -S` (DVC's round-trip YAML writer), and the guard
``pipeline.params_check.check_roundtrip`` catches a file that would not.

Bug guarded (issue 7, item 2): `dvc exp run -S tokenizer.gameplay.kind=mae` failed before running
anything with "unable to read: 'params.yaml', YAML file structure is corrupted": DVC rewrites the
file with ruamel, which drops the quotes of ``{url: "https://...", sha256: "..."}`` flow mappings,
and DVC's C-based YAML reader refuses a plain ``https://...`` inside a flow mapping.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, read_params
from pipeline.params_check import check_roundtrip

ROOT = Path(__file__).resolve().parents[1]
READ_PARAMS = 'python -c "from pipeline.config import read_params; read_params()"'


def trivial_dvc_yaml() -> dict:
    """The real dvc.yaml with every command replaced by a params read, and no deps/outs/metrics.

    The stages keep their real ``params`` declarations (and ``foreach``), so DVC tracks the same
    keys of params.yaml, but running a stage costs a Python start.
    """
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = {}
    for name, stage in real["stages"].items():
        body = stage.get("do", stage)
        slim = {"cmd": READ_PARAMS, "params": body.get("params", [])}
        stages[name] = {"foreach": stage["foreach"], "do": slim} if "foreach" in stage else slim
    return {"stages": stages}


def git_dvc_repo(path: Path, params_text: str) -> dict:
    """``path`` as a committed git + DVC repo holding ``params_text`` and the trivial dvc.yaml; returns its env."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    (path / "params.yaml").write_text(params_text)
    (path / "dvc.yaml").write_text(yaml.safe_dump(trivial_dvc_yaml(), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True)
    return env


def test_dvc_exp_run_set_param_on_the_real_params(tmp_path):
    """`dvc exp run -S tokenizer.gameplay.kind=mae` rewrites the real params.yaml readably, changing only that key."""
    original_text = (ROOT / "params.yaml").read_text()
    original = read_params(ROOT / "params.yaml")
    env = git_dvc_repo(tmp_path, original_text)
    proc = subprocess.run(
        ["dvc", "exp", "run", "-S", "tokenizer.gameplay.kind=mae", "tokenizer@gameplay"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"dvc exp run -S failed:\n{proc.stdout}\n{proc.stderr}"
    rewritten = tmp_path / "params.yaml"
    assert rewritten.read_text() != original_text, "DVC did not rewrite params.yaml"
    got = read_params(rewritten)
    expected = copy.deepcopy(original)
    expected["tokenizer"]["gameplay"]["kind"] = "mae"
    assert list(got) == list(original)
    for section in original:
        assert got[section] == expected[section], section
    # DVC's own reader too (what it hashes into dvc.lock), and the guard on the result.
    from dvc.utils.serialize import load_yaml
    assert load_yaml(str(rewritten)) == expected
    check_roundtrip(rewritten)


def test_guard_accepts_the_real_params():
    """The shipped params.yaml passes the guard."""
    check_roundtrip(ROOT / "params.yaml")


def with_flow_url_line(text: str) -> tuple[str, int]:
    """``text`` with ``mnist_digits.download.files.train_images`` written as one flow-style line.

    Returns the new text and the 1-based line of that key.
    """
    entry = yaml.safe_load(text)["mnist_digits"]["download"]["files"]["train_images"]
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if re.match(r"\s+train_images:", line))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and len(lines[end]) - len(lines[end].lstrip()) > indent:
        end += 1
    lines[start:end] = [f'{" " * indent}train_images: {{url: "{entry["url"]}", sha256: "{entry["sha256"]}"}}\n']
    return "".join(lines), start + 1


def test_guard_names_a_flow_style_url_line(tmp_path):
    """A flow-style ``{url: "https://...", ...}`` line (what DVC's writer breaks) is refused with its key and line."""
    text, line = with_flow_url_line((ROOT / "params.yaml").read_text())
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    assert yaml.safe_load(text) == yaml.safe_load((ROOT / "params.yaml").read_text())  # only the style differs
    with pytest.raises(ParamsError) as err:
        check_roundtrip(bad)
    msg = str(err.value)
    assert str(bad) in msg
    assert f"line {line}: 'mnist_digits.download.files.train_images'" in msg, msg
    assert "block style" in msg
    # The guard refuses exactly what breaks DVC: its own writer on this copy makes a file it cannot read.
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml
    from dvc.utils.serialize._yaml import YAMLFileCorruptedError

    apply_overrides(str(bad), ["tokenizer.gameplay.kind=mae"])
    with pytest.raises(YAMLFileCorruptedError):
        load_yaml(str(bad))


@pytest.mark.parametrize(
    "text, survives",
    [
        ('a:\n  u: {url: "https://x.y/z"}\n', False),                  # quotes dropped in a flow map
        ('a:\n  u: ["https://x.y/z"]\n', True),                         # lists are rewritten in block style
        ('a:\n  u:\n    url: "https://x.y/z"   # c\n', True),
        ('a:\n  q: {size: 32, levels: 16}\n  s: [0.0, 0.78]\n', True),  # short flow maps/lists stay
        ('a:\n  e: {val_fraction: 0.1, split_seed: 0, max_frames: 512, probe_frames: 64, batch_size: 64}\n',
         True),                                                         # folded over two lines, reads back
        ('a:\n  answer: "yes"\n', False),                               # unquoted `yes` is True for PyYAML
        ('a:\n  t: "1:30"\n', False),                                   # unquoted 1:30 is 90 for PyYAML
        ('a:\n  r: "4M"\n  n: null\n  f: "bv*[height<=360]/b"\n', True),
    ],
)
def test_guard_agrees_with_dvcs_writer(tmp_path, text, survives):
    """The guard's in-memory rewrite gives the same verdict as DVC's own writer and readers."""
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    path = tmp_path / "params.yaml"
    path.write_text(text)
    before = yaml.safe_load(text)
    apply_overrides(str(path), [])
    try:
        dvc_ok = load_yaml(str(path)) == before and yaml.safe_load(path.read_text()) == before
    except Exception:  # noqa: BLE001  (DVC's YAMLFileCorruptedError)
        dvc_ok = False
    assert dvc_ok is survives, f"DVC's writer made:\n{path.read_text()}"
    path.write_text(text)
    if survives:
        check_roundtrip(path)
    else:
        with pytest.raises(ParamsError, match=re.escape("line 2: 'a.")):
            check_roundtrip(path)


def test_gpu_profile_overrides_are_valid_params(tmp_path):
    """scripts/gpu_profile.sh (the GPU profile as `dvc exp run -S` overrides): every key it sets
    exists in params.yaml, and the sections it changes still pass their stages' typed configs."""
    from pipeline import dynamics, tokenizer
    from pipeline.config import load_section

    script = (ROOT / "scripts" / "gpu_profile.sh").read_text()
    overrides = re.findall(r"-S ([\w.]+)=(\S+)", script)
    assert len(overrides) >= 10, overrides
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides:
        *path, last = key.split(".")
        node = params
        for part in path:
            assert isinstance(node, dict) and part in node, f"gpu_profile.sh: {key}: no '{part}' in params.yaml"
            node = node[part]
        assert last in node, f"gpu_profile.sh: {key}: not a key of params.yaml"
        node[last] = yaml.safe_load(value)
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    for item in ("mnist", "gameplay"):
        tokenizer_cfg = load_section("tokenizer", tokenizer.Config, item=item, path=out)
        dynamics_cfg = load_section("dynamics", dynamics.Config, item=item, path=out)
    assert tokenizer_cfg.kind == "mae" and dynamics_cfg.flow.dim == 384
