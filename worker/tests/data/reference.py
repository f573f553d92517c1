"""Writes reference.json: values of some test files as independent decoders read them.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install pydicom numpy nibabel \
        pylibjpeg pylibjpeg-libjpeg pyjpegls
    /tmp/ref/bin/python worker/tests/data/reference.py

pydicom (with libjpeg for 12-bit JPEG) and nibabel, not dicom-rs or the nifti crate: the data
handler tests compare the worker's decoding against these.
"""
import json
import pathlib

import nibabel
import numpy as np
import pydicom

HERE = pathlib.Path(__file__).parent


def samples(flat, n=24):
    idx = np.linspace(0, flat.size - 1, n).astype(int)
    return [[int(i), float(flat[i])] for i in idx]


out = {}
# 32-bit samples: min-max scaled luminance, as the worker gives them without a window.
for name in ["rtdose_1frame.dcm", "SC_rgb_32bit.dcm"]:
    d = pydicom.dcmread(HERE / "dicom" / name)
    a = d.pixel_array.astype(np.float64)
    if a.ndim == 3:
        a = 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
    a = (a - a.min()) / (a.max() - a.min())
    out[name] = {"size": a.shape[0], "normalised": samples(a.reshape(-1))}
# 12-bit JPEG: the stored samples.
d = pydicom.dcmread(HERE / "dicom" / "JPGExtended.dcm")
a = d.pixel_array.astype(np.float64).reshape(-1)
out["JPGExtended.dcm"] = {
    "width": int(d.Columns),
    "height": int(d.Rows),
    "sum": float(a.sum()),
    "stored": samples(a),
}
# NIfTI-2: voxels in file order (x fastest).
im = nibabel.load(HERE / "nifti" / "example_nifti2.nii.gz")
v = np.asanyarray(im.dataobj).astype(np.float64)
out["example_nifti2.nii.gz"] = {
    "shape": list(v.shape),
    "voxels": samples(v.reshape(-1, order="F")),
}
(HERE / "reference.json").write_text(json.dumps(out, indent=1) + "\n")
