"""export_onnx checks where it writes before the work, and keeps stdout clean."""

import os

import onnxruntime as ort
import pytest
import torch
from torch import nn

import vbxfx
from vbxfx.errors import ExportError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()


def _unwritable_folder() -> str:
    """A folder nobody may create files in, root included (chmod does not stop root)."""
    for folder in ("/sys", "/proc/self"):
        try:
            os.rmdir(__import__("tempfile").mkdtemp(dir=folder))
        except OSError:
            return folder
    pytest.skip("no folder here refuses new files to this user")


def test_bad_output_paths_fail_before_the_export(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [(tmp_path, "it is a directory; give a file name"),
             (tmp_path / "missing" / "m.onnx", "does not exist"),
             (blocker / "m.onnx", "is not a directory"),
             (os.path.join(_unwritable_folder(), "m.onnx"), "is not writable")]
    for path, words in cases:
        with pytest.raises(ExportError, match=words) as caught:
            vbxfx.export_onnx(_net(), x, path)
        assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]     # no scratch left


class _RmsNet(nn.Module):
    """rms_norm: the TorchScript exporter fails (and prints its graph from C++), dynamo works."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, x):
        return torch.nn.functional.rms_norm(self.conv(x), (14,))


def test_the_fallback_export_prints_nothing(tmp_path, capfd):
    torch.manual_seed(0)
    model, x = _RmsNet().eval(), torch.randn(1, 3, 16, 16)
    result = vbxfx.compress(model, x, compression=0.5)
    capfd.readouterr()
    report = vbxfx.export_onnx(result.model, x, tmp_path / "rms.onnx")
    captured = capfd.readouterr()
    assert report.exporter == "dynamo"
    assert captured.out == "" and "Torch IR graph" not in captured.err
    assert vbxfx.check_onnx(tmp_path / "rms.onnx", torch_model=result.model, example_inputs=x).ok


def test_a_float64_model_gives_a_file_onnxruntime_runs(tmp_path):
    model, x = _net().double(), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    result = vbxfx.compress(model, x, compression=0.5)
    path = tmp_path / "f64.onnx"
    vbxfx.export_onnx(result.model, x, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.float().numpy()})[0]
    with torch.no_grad():
        ref = result.model(x).float().numpy()
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
