"""``python -m hakuriver.host`` is the ``hakuriver.host`` command."""

from hakuriver.host.service import main

main()
