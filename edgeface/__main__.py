import sys

from edgeface.cli import main

sys.exit(main())
