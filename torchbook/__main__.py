"""`python -m torchbook` is the `torchbook` command."""

import sys

from torchbook.cli import console_main

sys.exit(console_main())
