import sys

from engine.registry.cli import main

sys.exit(main())
