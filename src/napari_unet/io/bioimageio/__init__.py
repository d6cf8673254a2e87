"""BioImage Model Zoo (bioimage.io) packages: import, export and the spec's own test.

A package is a folder or ``.zip`` holding an RDF (``bioimageio.yaml`` or
``rdf.yaml``, format 0.5 and, where cheap, 0.4), weights and test tensors.

Import (:func:`load_package`) maps a package onto the overlap-tile engine:

* statistical pre-processing (``zero_mean_unit_variance``, ``scale_range``)
  becomes the engine's per-plane normalisation spec, so tiles share one
  plane's statistics and tiling stays seamless;
* pointwise steps (``scale_linear``, ``fixed_zero_mean_unit_variance``,
  ``clip``, ``binarize``, ...) run around the weights in :class:`PackageNet`;
  a final ``sigmoid`` / ``softmax`` becomes ``info.activation``;
* the geometry comes from the input axes (``min + n*step`` or a fixed size)
  and the halo is the larger of the declared one and the one measured on the
  network (gradients for PyTorch weights, perturbations for ONNX).

Weights: ``torchscript`` (``torch.jit.load``), ``pytorch_state_dict`` (the
package's architecture code runs only with ``trust_code=True``; weights via
``torch.load(weights_only=True)``) and ``onnx`` (optional ``onnxruntime``).
Nothing is ever downloaded and every declared sha256 is checked.

Export (:func:`export_package`) writes a project U-Net as a format 0.5.5 zip
with TorchScript and state-dict weights, test tensors, cover and README.
:func:`run_test_tensors` runs a package on its ``test_input`` exactly as the
spec does (one pass, no tiling) and compares with ``test_output``.

Layout: ``_files`` (reading folders, zips and RDFs), ``_rdf`` (parsing),
``_weights`` (integrity and weights), ``_processing`` (processing steps and
:class:`PackageNet`), ``_geometry`` (halo and tile multiple), ``_load``
(:func:`load_package`, :func:`run_test_tensors`), ``_cover`` and ``export``
(:func:`export_package`, :func:`architecture_source`).
"""

from napari_unet.io.bioimageio._files import RDF_NAMES as RDF_NAMES
from napari_unet.io.bioimageio._files import is_package
from napari_unet.io.bioimageio._load import load_package, run_test_tensors
from napari_unet.io.bioimageio._processing import POINTWISE as POINTWISE
from napari_unet.io.bioimageio._processing import STATISTICAL as STATISTICAL
from napari_unet.io.bioimageio._processing import PackageNet
from napari_unet.io.bioimageio._rdf import ENGINE_IN as ENGINE_IN
from napari_unet.io.bioimageio._rdf import ENGINE_OUT as ENGINE_OUT
from napari_unet.io.bioimageio._readme import UNET_CITATION as UNET_CITATION
from napari_unet.io.bioimageio._weights import WEIGHTS_ORDER as WEIGHTS_ORDER
from napari_unet.io.bioimageio._weights import OnnxNet
from napari_unet.io.bioimageio.export import FORMAT_VERSION as FORMAT_VERSION
from napari_unet.io.bioimageio.export import architecture_source, export_package

__all__ = [
    "OnnxNet",
    "PackageNet",
    "architecture_source",
    "export_package",
    "is_package",
    "load_package",
    "run_test_tensors",
]
