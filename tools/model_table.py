"""Print the parameter / MAC table of every Conformer variant (see conformer.models.profile)."""
import sys

from conformer.models.profile import main

if __name__ == '__main__':
    sys.exit(main())
