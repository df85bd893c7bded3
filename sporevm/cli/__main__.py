"""python -m sporevm.cli"""

import sys

from sporevm.cli import main

sys.exit(main())
