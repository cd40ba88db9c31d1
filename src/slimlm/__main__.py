import sys

from slimlm.cli import main

sys.exit(main())
