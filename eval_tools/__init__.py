"""Helpers behind ``evaluate.py``: metrics, probes, label subsets, embeddings, baselines, reports.

``evaluate.py`` is the CLI; this package holds the pieces so that ``quickstart.py`` and the tests can
call them in-process.
"""
