"""``python -m napari_unet ...``: the ``napari-unet`` command."""

import sys

from napari_unet.cli import main

sys.exit(main())
