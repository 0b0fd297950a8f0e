"""python -m pixify: the same as the pixify command."""

from .cli import entry

entry()
