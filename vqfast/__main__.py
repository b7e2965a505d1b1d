import sys

from vqfast.cli import main

sys.exit(main())
