"""Commands around the pipeline that are not pipeline steps (`skinlesion <command>`, see
cli.py): promote, predict, runs, exp, demo, synth, info."""
