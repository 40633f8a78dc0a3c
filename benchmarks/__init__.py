"""Benchmarks of wm-trainer and its toolkit (``make bench``)."""
import extensions.chainer_compat  # noqa: F401  (first: every benchmark imports Chainer, which needs the shims)
