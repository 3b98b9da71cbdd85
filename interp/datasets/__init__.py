"""Published datasets read in their official formats, with their official metrics.

* :mod:`interp.datasets.bbq`: BBQ (Parrish et al., 2022): the release's JSONL files and
  ``additional_metadata.csv``, answer parsing, and the bias scores of its analysis scripts.

GSM8K's helpers are in :mod:`interp.data`.
"""

from interp.datasets import bbq

__all__ = ["bbq"]
