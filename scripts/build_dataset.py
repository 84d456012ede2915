#!/usr/bin/env python
"""Build a labelled synthetic dataset from a DP generator: the same as `synthgen build-dataset`.

A script path, so that launchers can start it in several processes:

    torchrun --nproc_per_node 4 scripts/build_dataset.py REPO --num-samples 1000000 --out DIR
    accelerate launch --multi_gpu --num_processes 4 scripts/build_dataset.py REPO --num-samples 1000000 --out DIR

Every process writes its own shards into DIR; see `synthgen build-dataset --help`.
"""

import sys

from synthgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-dataset", *sys.argv[1:]]))
