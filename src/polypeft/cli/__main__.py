"""`python -m polypeft.cli`: the `polypeft` command, as launchers start it (`accelerate launch -m`, `torchrun -m`)."""
import sys

from .main import main

sys.exit(main())
