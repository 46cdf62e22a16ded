import sys

from megatron_foresight.cli import main

sys.exit(main())
