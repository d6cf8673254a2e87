"""``python -m napari_unet.cli ...`` (as ``napari-unet ...``)."""

import sys

from napari_unet.cli import main

sys.exit(main())
