"""``python -m interp.sae``: the SAE pipeline (``interp.sae.pipeline``)."""

from interp.sae.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
