"""ONNX -> the int8 TFLite that ``vnnx_compile`` reads, through onnx2tf, without harm to the ONNX.

:func:`convert_to_tflite` (``vbxfx export model.onnx --tflite model.tflite``) works around
what onnx2tf does to its user (``docs/format.md``, "The hand-off"):

* onnx2tf rewrites its input ``.onnx`` in place (onnxsim, sng4onnx), which drops the vbxfx
  annotations: it is given a private copy in a work folder; the user's file is hashed before
  and after and stays byte-identical.
* ``-oiqt`` downloads sample calibration data unless ``-cind`` is given, and its validation
  still wants ``calibration_image_sample_data_20x128x128x3_float32.npy`` in its working
  folder: vbxfx writes both, calibration from the user's ``calib`` (an image folder, a
  ``.pt``/``.npy`` tensor, ``skimage[:N]``) or natural images bundled with scikit-image.
  Nothing is downloaded.
* onnx2tf and TensorFlow live in an environment of their own (``bash
  tools/setup_tflite_env.sh DIR`` builds the set the VectorBlox SDK pins; numpy 1.23 does not
  sit beside vbxfx's numpy 2); onnx2tf runs as a subprocess, found by :func:`find_onnx2tf`.

Then it copies ``saved_model/model_full_integer_quant.tflite`` to the output (an existing
file is kept unless ``force``) and runs :func:`vbxfx.check_tflite` on it with the ONNX's
annotations as the expectation. onnx2tf's ``model_float32.tflite`` (the same graph, op for op,
in float) is kept beside it as ``NAME_float32.tflite`` (:func:`float_reference_path`): the
reference that ``vbxfx check model.tflite --model SPEC --calib DATA`` compares every int8
tensor with (:func:`vbxfx.quant.compare_int8`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vbxfx.errors import CheckError, ExportError
from vbxfx.quant.files import float_reference_path

__all__ = ["convert_to_tflite", "find_onnx2tf", "float_reference_path", "converter_versions",
           "TfliteExport", "SDK_VERSIONS", "INT8_METHODS", "INT8_SAMPLES",
           "ENV_ONNX2TF", "ENV_TFLITE_ENV", "DEFAULT_ENV_DIR", "SAMPLE_FILE"]

logger = logging.getLogger(__name__)

#: The converter versions the public VectorBlox SDK (v3.1) pins and vbxfx was checked with.
SDK_VERSIONS = {"onnx2tf": "1.22.3", "tensorflow-cpu": "2.15.1"}
ENV_ONNX2TF = "VBXFX_ONNX2TF"          # path of the onnx2tf executable
ENV_TFLITE_ENV = "VBXFX_TFLITE_ENV"    # a folder built by tools/setup_tflite_env.sh
DEFAULT_ENV_DIR = ".venv-tflite"       # looked up in the working folder, last
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
DEFAULT_CALIB = "skimage:20"
#: ``int8=``: how the converter's int8 file is calibrated (vbxfx.quant.calibrate.METHODS).
INT8_METHODS = ("bias", "optq", "ranges", "converter")
#: Calibration samples the int8 calibration runs on (the first ones of ``calib``).
INT8_SAMPLES = 32
_MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "none": None}
_INSTALL = ("build it with `bash tools/setup_tflite_env.sh .venv-tflite` (from a vbxfx "
            "checkout; the onnx2tf 1.22.3 / tensorflow-cpu 2.15.1 set of the VectorBlox SDK, "
            "Python 3.11) and give --onnx2tf .venv-tflite/bin/onnx2tf or set "
            f"{ENV_ONNX2TF}")


@dataclass
class TfliteExport:
    """What :func:`convert_to_tflite` did: the file written, the converter, the check."""

    onnx: str
    output: str
    onnx2tf: str
    versions: dict[str, str]
    calibration: str
    seconds: float
    check: Any = None            # a vbxfx.check.tflite_check.TfliteCheckReport
    notes: list[str] = field(default_factory=list)
    float_output: str | None = None   # onnx2tf's float32 TFLite of the same graph, if kept
    int8: Any = None                  # a vbxfx.quant.calibrate.CalibrationReport

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "output": self.output, "float_output": self.float_output,
                "int8": None if self.int8 is None else self.int8.to_dict(),
                "onnx2tf": self.onnx2tf,
                "versions": dict(self.versions), "calibration": self.calibration,
                "seconds": self.seconds, "notes": list(self.notes),
                "check": None if self.check is None else self.check.to_dict()}


# ------------------------------------------------------------------------------ the converter


def find_onnx2tf(explicit: str | None = None) -> str:
    """The onnx2tf executable: ``explicit``, ``$VBXFX_ONNX2TF``, ``$VBXFX_TFLITE_ENV/bin``,
    ``onnx2tf`` on PATH, then ``./.venv-tflite/bin/onnx2tf``.

    Raises:
        ExportError: none of them is an executable file (the message says how to install it).
    """
    tried = []
    if explicit:
        tried.append(("--onnx2tf", explicit))
    elif os.environ.get(ENV_ONNX2TF):
        tried.append((ENV_ONNX2TF, os.environ[ENV_ONNX2TF]))
    elif os.environ.get(ENV_TFLITE_ENV):
        tried.append((ENV_TFLITE_ENV, os.path.join(os.environ[ENV_TFLITE_ENV], "bin", "onnx2tf")))
    else:
        tried.append(("PATH", shutil.which("onnx2tf") or ""))
        tried.append(("default", os.path.join(DEFAULT_ENV_DIR, "bin", "onnx2tf")))
    for _, path in tried:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    where = "; ".join(f"{k}: {v or 'not found'}" for k, v in tried)
    raise ExportError(f"onnx2tf is not installed or not executable ({where}); {_INSTALL}")


def converter_versions(onnx2tf: str) -> dict[str, str]:
    """Versions of onnx2tf and TensorFlow in the environment of ``onnx2tf`` (its script's
    interpreter); empty when they cannot be read."""
    try:
        with open(onnx2tf, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
    except OSError:
        return {}
    python = first[2:].strip() if first.startswith("#!") else ""
    if not python or not os.path.isfile(python.split()[0]):
        return {}
    code = ("import importlib.metadata as m, json\nout = {}\n"
            "for name in ('onnx2tf', 'tensorflow-cpu', 'tensorflow', 'onnx'):\n"
            "    try: out[name] = m.version(name)\n    except Exception: pass\n"
            "print(json.dumps(out))")
    try:
        done = subprocess.run(python.split() + ["-c", code], capture_output=True, text=True,
                              timeout=120, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ inputs


def _image_input(proto, where: str) -> tuple[str, tuple[int, int, int, int]]:
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ExportError(f"{where}: {len(inputs)} graph inputs; the TFLite hand-off takes "
                          "models with one image input [1, C, H, W]")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims)
    if len(shape) != 4 or min(shape) < 1:
        raise ExportError(f"{where}: input {inputs[0].name!r} has shape "
                          f"{[d.dim_value or d.dim_param or '?' for d in dims]}; a static "
                          "[1, C, H, W] is needed (export with fixed example inputs)")
    return inputs[0].name, (1,) + shape[1:]


def _calibration(calib: Any, shape: tuple[int, ...], normalize: str) -> tuple[Any, Any, str]:
    """``(NHWC float32 data, (mean, std) or None, description)`` for onnx2tf's -cind."""
    import numpy as np
    import torch

    from vbxfx.inputs.calib import load_calibration, natural_image_crops
    from vbxfx.errors import ConfigError

    if normalize not in _MEAN_STD:
        raise ExportError(f"normalize must be one of {tuple(_MEAN_STD)}, got {normalize!r}")
    _, c, h, w = shape
    spec = DEFAULT_CALIB if calib is None else calib
    stats = _MEAN_STD[normalize]
    try:
        if isinstance(spec, torch.Tensor):
            data, stats, what = spec.detach().float().cpu(), None, "the given tensor"
        elif str(spec) == "skimage" or str(spec).startswith("skimage:"):
            text = str(spec)
            try:
                n = int(text.split(":", 1)[1]) if ":" in text else 20
            except ValueError as e:
                raise ExportError(f"calibration {text!r}: skimage:N takes a count") from e
            if c != 3 or n < 1:
                raise ExportError(f"calibration {text!r}: natural images need a 3-channel "
                                  f"input and N >= 1 (input is {list(shape)})")
            data = natural_image_crops(n, size=max(h, w), normalize=False)
            if (h, w) != tuple(data.shape[2:]):
                data = torch.nn.functional.interpolate(data, size=(h, w), mode="bilinear",
                                                       antialias=True, align_corners=False)
            what = f"{n} natural-image crops (scikit-image)"
        else:
            path = os.fspath(spec)
            data = load_calibration(path, shape, normalize=False)
            if not os.path.isdir(path):
                stats = None            # tensors are already preprocessed
            what = path
    except ConfigError as e:
        raise ExportError(str(e)) from e
    if tuple(data.shape[1:]) != tuple(shape[1:]):
        raise ExportError(f"calibration data has shape {tuple(data.shape)}; the model takes "
                          f"[N, {', '.join(map(str, shape[1:]))}]")
    normalized = stats is not None and normalize != "none"
    if stats is None:
        stats = ((0.0,) * c, (1.0,) * c)
    elif c != 3:
        raise ExportError(f"--normalize {normalize} needs a 3-channel input, the model has {c}")
    nhwc = np.ascontiguousarray(data.permute(0, 2, 3, 1).numpy().astype(np.float32))
    return nhwc, stats, what + (f", normalized ({normalize})" if normalized else
                                ", taken as preprocessed" if normalize != "none" else "")


def _nested(values) -> str:
    return "[[[[" + ",".join(repr(float(v)) for v in values) + "]]]]"


def _cut(proto, cut: Any, src: str):
    from vbxfx.errors import ConfigError
    from vbxfx.export.cut import cut_onnx

    if cut == "detect-head":
        from vbxfx.integrations.ultralytics_head import head_outputs
        try:
            cut = head_outputs(proto, src)
        except ConfigError as e:
            raise ExportError(str(e)) from e
    elif isinstance(cut, str):
        cut = [cut]
    return cut_onnx(proto, cut, src)


def _copy_onnx(proto, src: str, dst: str) -> None:
    """Copy the ONNX file and any external-data files it names, side by side."""
    shutil.copyfile(src, dst)
    base, seen = os.path.dirname(os.path.abspath(src)), set()
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                target = os.path.join(os.path.dirname(dst), entry.value)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(os.path.join(base, entry.value), target)


# ------------------------------------------------------------------------------ conversion

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MILESTONE = re.compile(r"^(.*?(started|complete!?))\s*=*\s*$")
_STEP = re.compile(r"^INFO: (\d+) / (\d+)\s*$")


def _run(cmd: list[str], cwd: str, env: dict[str, str], log_path: str,
         progress: Callable[[str], None]) -> int:
    t0, last = time.perf_counter(), 0.0
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1) as proc:
        for raw in proc.stdout:
            log.write(raw)
            line = _ANSI.sub("", raw).strip()
            elapsed = time.perf_counter() - t0
            m, step = _MILESTONE.match(line), _STEP.match(line)
            if m and not line.startswith("INFO"):
                progress(f"onnx2tf: {m.group(1)} ({elapsed:.0f} s)")
                last = elapsed
            elif step and elapsed - last >= 10:
                progress(f"onnx2tf: converting op {step.group(1)} / {step.group(2)} "
                         f"({elapsed:.0f} s)")
                last = elapsed
        return proc.wait()


def _tail(log_path: str, n: int = 3) -> str:
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [_ANSI.sub("", x).strip() for x in f if x.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-600:]


def _calibrate(made: str, made_float: str, data, mean, std, method: str, result, say,
               expect: str | None):
    """The int8 calibration of onnx2tf's file in the work folder (None when it cannot run);
    layers declared in the unstructured format keep their filters."""
    import numpy as np

    from vbxfx.check.tflite_check import check_tflite
    from vbxfx.errors import VbxError
    from vbxfx.quant.calibrate import calibrate_int8

    if not os.path.isfile(made_float):
        result.notes.append("no float32 file from onnx2tf: the int8 file is not calibrated")
        return None
    x = (np.asarray(data[:INT8_SAMPLES], np.float64) - np.asarray(mean)) / np.asarray(std)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)     # NHWC -> NCHW
    try:
        rows = check_tflite(made, expect=expect).layers if expect is not None else []
        keep = frozenset(r.op_index for r in rows if r.declared_fmt == "ucomp")
        return calibrate_int8(made, made_float, x, method=method, keep_filters=keep,
                              progress=say)
    except VbxError as e:
        result.notes.append(f"int8 calibration skipped, the converter's file kept: {e}")
        return None
    except Exception as e:  # a failure here must not cost the user the converted file
        logger.debug("int8 calibration failed", exc_info=True)
        result.notes.append(f"int8 calibration failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}), the "
                            "converter's file kept")
        return None


def convert_to_tflite(onnx_path: str | os.PathLike, output: str | os.PathLike, *,
                      calib: Any = None, normalize: str = "imagenet",
                      onnx2tf: str | None = None, force: bool = False,
                      work_dir: str | None = None, keep_float: bool = True,
                      int8: str = "bias", cut: Any = None,
                      progress: Callable[[str], None] | None = None) -> TfliteExport:
    """Convert ``onnx_path`` to int8 TFLite at ``output`` and check it (module docstring).

    Args:
        calib: calibration data: an image folder, a ``.pt``/``.npy`` tensor ``[N, C, H, W]``
            (already preprocessed), ``"skimage:N"``, or a Tensor; default 20 natural images.
        normalize: ``"imagenet"`` (mean/std of torchvision models, applied to images) or
            ``"none"`` (inputs in [0, 1], e.g. ultralytics YOLO).
        onnx2tf: the onnx2tf executable (default: :func:`find_onnx2tf`).
        force: overwrite an existing ``output`` (and its float32 reference).
        int8: ``"bias"`` (default), ``"optq"``, ``"ranges"`` or ``"converter"``: how the int8
            file is calibrated after onnx2tf (:func:`vbxfx.quant.calibrate.calibrate_int8`, on the
            first :data:`INT8_SAMPLES` calibration samples; needs ai-edge-litert).
        cut: tensor names to end the converted graph at (:func:`vbxfx.export.cut.cut_onnx`;
            the host computes the rest), or ``"detect-head"``: the raw outputs of an
            ultralytics Detect head (:func:`vbxfx.integrations.ultralytics_head.head_outputs`).
        keep_float: also write onnx2tf's float32 TFLite of the same graph at
            :func:`float_reference_path` (``model_float32.tflite``), the per-layer reference
            of :func:`vbxfx.quant.compare_int8`.
        work_dir: keep onnx2tf's work (copy, calibration, saved_model, onnx2tf.log) in this
            new or empty folder instead of a temporary one.
        progress: called with one line per conversion stage.

    Raises:
        ExportError: the ONNX or the options cannot be used, onnx2tf is missing or fails,
            or ``output`` (or, with ``keep_float``, its float32 reference) exists and
            ``force`` is not set. Nothing is written then.
    """
    import numpy as np

    from vbxfx.check.tflite_check import check_tflite
    from vbxfx.export.reader import load_onnx, read_annotations

    say = progress or (lambda text: None)
    t0 = time.perf_counter()
    src, out = os.fspath(onnx_path), os.fspath(output)
    try:
        proto = load_onnx(src, load_external_data=False)
    except CheckError as e:
        raise ExportError(str(e)) from e
    if os.path.abspath(out) == os.path.abspath(src):
        raise ExportError(f"{out}: the TFLite output would replace the ONNX input")
    if os.path.exists(out) and not force:
        raise ExportError(f"{out} exists; vbxfx does not overwrite it (give --force)")
    if int8 not in INT8_METHODS:
        raise ExportError(f"int8 must be one of {INT8_METHODS}, got {int8!r}")
    float_out = float_reference_path(out) if keep_float else None
    if float_out is not None and os.path.abspath(float_out) == os.path.abspath(src):
        raise ExportError(f"{float_out}: the float32 reference would replace the ONNX input")
    if float_out is not None and os.path.exists(float_out) and not force:
        raise ExportError(f"{float_out} exists (the float32 reference written beside {out}); "
                          "vbxfx does not overwrite it (give --force, or --no-float)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ExportError(f"{out}: folder {os.path.dirname(os.path.abspath(out))} does not exist")
    if cut is not None:
        proto = _cut(proto, cut, src)
    name, shape = _image_input(proto, src)
    try:
        read_annotations(src)
        expect = src
    except CheckError as e:
        expect = None
        logger.warning("%s: no usable vbxfx annotations (%s); the TFLite is checked on its own",
                       src, e)
    exe = onnx2tf or find_onnx2tf()
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise ExportError(f"onnx2tf {exe!r} is not an executable file; {_INSTALL}")
    versions = converter_versions(exe)
    data, (mean, std), described = _calibration(calib, shape, normalize)
    result = TfliteExport(src, out, exe, versions, described, 0.0)
    got = versions.get("onnx2tf")
    if got and got != SDK_VERSIONS["onnx2tf"]:
        result.notes.append(f"onnx2tf {got}: vbxfx's repeats were checked against onnx2tf "
                            f"{SDK_VERSIONS['onnx2tf']} (the VectorBlox SDK's)")
    if expect is None:
        result.notes.append(f"{src} has no vbxfx annotations: the TFLite is checked on its own")
    before = _sha256(src)
    if work_dir is not None and os.path.isdir(work_dir) and os.listdir(work_dir):
        raise ExportError(f"--work-dir {work_dir} is not empty")
    with tempfile.TemporaryDirectory(prefix="vbxfx-tflite-") as tmp:
        work = tmp if work_dir is None else work_dir
        os.makedirs(work, exist_ok=True)
        if cut is None:
            _copy_onnx(proto, src, os.path.join(work, "model.onnx"))
        else:
            import onnx
            onnx.save(proto, os.path.join(work, "model.onnx"))
        np.save(os.path.join(work, "calib.npy"), data)
        rng = np.random.default_rng(0)      # onnx2tf's validation step only loads this file
        np.save(os.path.join(work, SAMPLE_FILE),
                rng.random((20, 128, 128, 3), dtype=np.float32))
        cmd = [exe, "-i", "model.onnx", "-o", "saved_model", "-oiqt",
               "-cind", name, "calib.npy", _nested(mean), _nested(std)]
        env = dict(os.environ, PATH=os.path.dirname(exe) + os.pathsep + os.environ.get("PATH", ""),
                   TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
        say(f"onnx2tf {versions.get('onnx2tf', '?')} (tensorflow "
            f"{versions.get('tensorflow-cpu') or versions.get('tensorflow', '?')}) on a copy of "
            f"{src}, calibration: {described}")
        log = os.path.join(work, "onnx2tf.log")
        rc = _run(cmd, work, env, log, say)
        made = os.path.join(work, "saved_model", "model_full_integer_quant.tflite")
        if rc != 0 or not os.path.isfile(made):
            keep = f" (log: {log})" if work_dir else " (give --work-dir DIR to keep its log)"
            raise ExportError(f"onnx2tf failed with exit code {rc}{keep}: {_tail(log)}")
        made_float = os.path.join(work, "saved_model", "model_float32.tflite")
        if float_out is not None and os.path.isfile(made_float):
            shutil.copyfile(made_float, float_out + ".partial")
            os.replace(float_out + ".partial", float_out)
            result.float_output = float_out
        elif float_out is not None:
            result.notes.append("onnx2tf wrote no model_float32.tflite: compare the int8 file "
                                "end to end only")
        if int8 != "converter":
            result.int8 = _calibrate(made, made_float, data, mean, std, int8, result, say,
                                     expect)
        partial = out + ".partial"
        shutil.copyfile(made, partial)
        os.replace(partial, out)
    if _sha256(src) != before:       # cannot happen: onnx2tf only saw the copy
        raise ExportError(f"{src} changed during the conversion")
    say(f"wrote {out}; checking it")
    result.check = check_tflite(out, expect=expect)
    result.seconds = time.perf_counter() - t0
    logger.info("converted %s -> %s in %.1f s", src, out, result.seconds)
    return result
