"""``python -m quantvla_fx`` is the ``quantvla-fx`` command."""
import sys

from .cli import main

sys.exit(main())
