"""``python -m pretrain.corpus`` / ``torchrun --nproc_per_node 2 -m pretrain.corpus --runs ... --out ...``."""

import sys

from learned_opt.cli import main as cli_main

sys.exit(cli_main(["corpus", *sys.argv[1:]]))
