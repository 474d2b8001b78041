"""Pipeline steps (one module each, with `run(...)` and `main(argv)`) and their shared helpers."""
