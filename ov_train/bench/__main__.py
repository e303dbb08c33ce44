import sys

from ov_train.cli.bench import main

main(sys.argv[1:])
