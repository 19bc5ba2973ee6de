import sys

from keyq.chaos.run import main

sys.exit(main())
