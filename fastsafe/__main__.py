import sys

from fastsafe.cli import main

sys.exit(main())
