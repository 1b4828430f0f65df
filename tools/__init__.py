"""Operations tools beside the pipeline, run from the repo root with `python -m tools.<name>`: not pipeline code."""
