"""`python -m predictor`: the predict command."""
import sys

from predictor.predict import main

sys.exit(main())
