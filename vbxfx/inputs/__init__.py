"""What a user hands vbxfx besides the model object: model specs given on the command line
(:mod:`vbxfx.inputs.model_spec`), calibration data (:mod:`vbxfx.inputs.calib`) and the demo
network that needs no download (:mod:`vbxfx.inputs.demo`)."""

from vbxfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "vbxfx.inputs.model_spec": ("resolve_model", "ResolvedModel", "parse_input_shape"),
    "vbxfx.inputs.calib": ("load_calibration", "calibration_from_spec", "natural_image_crops"),
    "vbxfx.inputs.demo": ("DemoNet",),
})
