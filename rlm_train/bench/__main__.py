"""`python -m rlm_train.bench <what> [--repeats N] [--json-out F]`: the same as `rlm-train bench`."""

import argparse
import sys

from rlm_train.bench import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m rlm_train.bench")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
