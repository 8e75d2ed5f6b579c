"""`python -m trainer`: the same as `cifar10-hvd train`."""
import sys

from trainer.train import main

sys.exit(main())
