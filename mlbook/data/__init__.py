"""Dataset loaders: find or download the official archives, check them, and
cache the decoded tensors. ``from mlbook.data import omniglot``; introduced in
``book/07_few_shot_images``."""

from . import omniglot

__all__ = ["omniglot"]
