"""``python -m curvscope``."""

from .cli import main

main()
