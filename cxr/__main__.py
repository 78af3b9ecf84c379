"""`python -m cxr`: the cxr command."""

import sys

from cxr.cli import main

sys.exit(main())
