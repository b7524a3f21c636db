"""`python -m torchbook.cli` is the `torchbook` command."""

import sys

from torchbook.cli import main

sys.exit(main())
