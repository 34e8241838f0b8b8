"""Benchmark harness for relay: engines and competitors side by side in one interleaved batch.

Run with ``python -m bench`` (``make bench``); see ``bench/__main__.py`` for the options.
"""
