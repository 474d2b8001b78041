"""Basics every layer uses: params and step configs (config.py), the file names between
steps (outputs.py), the command-line flag style (cli_args.py), atomic writes (atomic.py),
label files (labels.py), image decoding shared by preprocess and serving (images.py) and MLflow
connection handling (tracking.py)."""
