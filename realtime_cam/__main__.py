"""python -m realtime_cam"""

import sys

from .cli import main

sys.exit(main())
