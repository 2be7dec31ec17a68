"""`python -m soar_fast.train ...` == `soar-fast train ...` (the form torchrun launches:
`torchrun --nproc_per_node N -m soar_fast.train --recipe tiny ...`)."""

import sys

from soar_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
