"""`python -m rlm_train.bench <what> [--repeats N] [--json-out F]`: the same as `rlm-train bench`
(through the CLI, so bad input gets the same one-line errors)."""

import sys

from rlm_train.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
