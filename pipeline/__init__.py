"""The Kubeflow pipeline: KFP component wrappers around `components.<step>.run`
(`pipeline.kfp_components`), the pipeline function (`pipeline.pipeline`), data materialisation
(`pipeline.data`) and the `skinlesion pipeline compile|submit|run-local` command
(`pipeline.cli`).

Nothing is defined here on purpose: the container imports `pipeline.data` at run time, and
code must not depend on this file being executed (an editable install made before it
existed treats `pipeline` as a namespace package).
"""
