"""Every command in README.md is run: each Python block on its own in a fresh interpreter (a
reader copies one block, not the page), CLI lines in a subprocess, and the install+test line is
the one .ci/run runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VBXFX = [sys.executable, "-m", "vbxfx"]


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd ", "export ", "rm "))]
    assert ci[-1].replace(" -q", "") in README.replace(" -q", "")


# The ultralytics block trains on COCO8 for 100 epochs at 640 px: here it runs on a detection
# set generated on the spot, one epoch at 64 px, with ultralytics' settings kept offline.
_YOLO_RUN = ('data="coco8.yaml", epochs=100, imgsz=640',
             'data=DATA, epochs=1, imgsz=64, batch=8, workers=0, plots=False, device="cpu"')
_YOLO_SETUP = """import sys
sys.path.insert(0, {tools!r})
from yolo_data import make_detection_set, offline_ultralytics
offline_ultralytics({tmp!r})
DATA = str(make_detection_set({tmp!r} + "/data", train=16, val=8, size=64))
"""


def _runnable(code: str, tmp_path: Path) -> str:
    if "compressed_trainer" not in code:
        return code
    assert _YOLO_RUN[0] in code, "the README's YOLO block changed: update _YOLO_RUN"
    setup = _YOLO_SETUP.format(tools=str(ROOT / "tools"), tmp=str(tmp_path))
    return setup + code.replace(*_YOLO_RUN)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_blocks_run(index, tmp_path):
    code = _blocks("python")[index]
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(_runnable(code, tmp_path))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "YOLO_OFFLINE": "1"})
    assert proc.returncode == 0, f"README python block {index}:\n{code}\n{proc.stderr[-3000:]}"


def _cli_lines():
    lines = []
    for block in _blocks("bash"):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip().startswith("vbxfx ")]
    return lines


@pytest.mark.slow
def test_cli_lines_run(tmp_path):
    lines = _cli_lines()
    assert any(ln.startswith("vbxfx demo") for ln in lines)
    for line in lines:
        args = line.split()[1:]
        proc = subprocess.run(VBXFX + args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "YOLO_OFFLINE": "1"})
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
