"""Attention sinks + a local window, exact (the training-free baseline): ``chunk.py`` fast, ``naive.py`` its twin."""

from .chunk import sink_window_attention

__all__ = ["sink_window_attention"]
