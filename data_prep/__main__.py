"""`python -m data_prep` runs `cifar10-hvd prepare`."""
import sys

from data_prep.cli import main

sys.exit(main())
