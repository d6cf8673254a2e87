"""Size arithmetic of fully convolutional networks.

A :class:`Geometry` says which input sizes a network accepts, the output size
for each, the *halo* (context a valid output pixel needs on each side) and the
*multiple* (the stride of the deepest feature map). Sizes are per spatial axis.

For the paper's valid-padding U-Net of depth ``d`` (``m = 2**d``):

* accepted inputs are ``n = m * b + 4 * (m - 1)`` (so ``n = -4 mod m``),
* the output is ``n - (12 m - 8)`` pixels, so ``572 -> 388`` for ``d = 4``,
* the halo is ``6 m - 4 = 92`` pixels for ``d = 4``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Geometry:
    """Accepted input sizes and context of a fully convolutional network.

    Attributes
    ----------
    multiple : int
        Accepted input sizes step by this many pixels; tile origins must be on
        this grid for tiled and one-pass outputs to agree.
    offset : int
        Accepted input sizes are ``offset (mod multiple)``.
    min_input : int
        Smallest accepted input size.
    shrink : int
        ``input - output`` size (0 for same padding, ``2 * halo`` for valid).
    halo : int
        Context pixels needed on each side of an output pixel.
    """

    multiple: int
    offset: int
    min_input: int
    shrink: int
    halo: int

    def __post_init__(self) -> None:
        # geometries are also read from files: refuse what would divide by zero or
        # give negative sizes later, with a message naming the field
        lowest = {"multiple": 1, "offset": 0, "min_input": 1, "shrink": 0, "halo": 0}
        for name, least in lowest.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"geometry {name} must be an integer, got {value!r}")
            if value < least:
                raise ValueError(f"geometry {name} must be >= {least}, got {value}")
            object.__setattr__(self, name, int(value))
        if self.shrink % 2:
            raise ValueError(
                f"geometry shrink must be even (a border per side), got {self.shrink}"
            )

    @property
    def valid(self) -> bool:
        """True when the network trims its borders (valid convolutions)."""
        return self.shrink > 0

    def accepts(self, n: int) -> bool:
        """Whether an input of size ``n`` is accepted."""
        return n >= self.min_input and (n - self.offset) % self.multiple == 0

    def output_size(self, n: int) -> int:
        """Output size for input size ``n``; ``ValueError`` if not accepted."""
        if not self.accepts(n):
            lo, hi = self.valid_sizes_near(n)
            raise ValueError(
                f"input size {n} is not accepted by this network; nearest accepted: "
                f"{lo if lo is not None else '-'} or {hi}"
            )
        return n - self.shrink

    def snap(self, n: int, direction: str = "down") -> int:
        """The accepted size nearest ``n`` going ``"down"``, ``"up"`` or ``"nearest"``."""
        lo, hi = self.valid_sizes_near(n)
        if direction == "up" or lo is None:
            return hi
        if direction == "down":
            return lo
        return lo if n - lo <= hi - n else hi

    def valid_sizes_near(self, n: int) -> tuple[int | None, int]:
        """Accepted sizes ``(at or below n, at or above n)``; None below the minimum."""
        k = math.floor((n - self.offset) / self.multiple)
        lo = self.offset + k * self.multiple
        hi = lo if lo == n else lo + self.multiple
        if hi < self.min_input:
            hi = self.min_input
        return (lo if lo >= self.min_input else None), hi

    def input_for_output(self, out: int) -> int:
        """Smallest accepted input whose output is at least ``out`` pixels."""
        return self.snap(out + self.shrink, "up")

    def to_dict(self) -> dict:
        """Plain dict for model cards."""
        return asdict(self)


def _unet_sizes_ok(n: int, depth: int, valid: bool) -> bool:
    c = 4 if valid else 0
    sizes = [n]
    x = n
    for _ in range(depth):
        x -= c
        if x < 2 or x % 2:
            return False
        x //= 2
        sizes.append(x)
    x -= c
    if x < 1:
        return False
    for _ in range(depth):
        x = 2 * x - c
        if x < 1:
            return False
    return True


def unet_geometry(depth: int, padding: str, upsample: str = "transpose") -> Geometry:
    """Geometry of :class:`~napari_unet.model.unet.UNet` with this depth, padding and
    up-sampling."""
    m = 2**depth
    valid = padding == "valid"
    offset = (4 * (m - 1)) % m if valid else 0
    n = offset if offset > 0 else m
    while not _unet_sizes_ok(n, depth, valid):
        n += m
    shrink = 12 * m - 8 if valid else 0
    # Context per side: two 3x3 convs per level on both paths and the
    # bottleneck give 6m - 4. A valid network needs exactly its trimmed border
    # as padding; a same network's furthest dependency (all pooling phases)
    # reaches 2 pixels further from depth 2 on (checked against the structural
    # receptive field in tests/model/test_shapes.py).
    halo = 6 * m - 4 if valid else 6 * m - 4 + (2 if depth >= 2 else 0)
    if upsample == "bilinear":  # interpolation reaches further (structural: m more)
        halo += m
    return Geometry(multiple=m, offset=offset, min_input=n, shrink=shrink, halo=halo)
