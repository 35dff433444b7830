"""``python -m abm_rt`` is the ``abm-rt`` command."""
import sys

from .cli import main

sys.exit(main())
