"""Commands around the pipeline that are not pipeline steps (`skinlesion <command>`, see
cli.py): promote, predict, serve, runs, exp, demo, synth, info."""
