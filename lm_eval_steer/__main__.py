import sys

from lm_eval_steer.cli import main

sys.exit(main())
