import sys

from razorfs.cli import main

sys.exit(main())
