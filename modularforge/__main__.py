import sys

from modularforge.cli import main

sys.exit(main())
