"""agegender: face age-group and gender classifiers, from training to a torch-free CPU runtime."""

import os as _os

__version__ = "0.1.0"

# OpenCV reads its decode limit once, when cv2 is loaded: set here, before any command imports
# cv2, it refuses an image from its header alone (every format), never after a huge decode.
# runtime.imageio.MAX_PIXELS is the same number (checked by its tests).
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "64000000")
