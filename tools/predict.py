"""Top-5 labels with probabilities for image files and folders.

Same as the `conformer-predict` console script; see conformer/predict.py."""
import sys

from conformer.predict import main

if __name__ == '__main__':
    sys.exit(main())
