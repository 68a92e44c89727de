import sys

from loradrift.cli import main

sys.exit(main())
