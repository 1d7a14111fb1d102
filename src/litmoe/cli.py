"""What every command line here shares: expected errors become one line on stderr and exit status 2."""

import sys
from collections.abc import Callable
from typing import Any

from litmoe.errors import UserError


def run_cli(main: Callable[[], Any]) -> None:
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
