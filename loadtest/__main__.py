"""`python -m loadtest` = `nanoserve loadtest`: the concurrency sweep."""
import sys

from loadtest.sweep import main

sys.exit(main())
