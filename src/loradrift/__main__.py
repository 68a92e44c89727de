from loradrift.cli import main
import sys
sys.exit(main())
