"""Everything Kubeflow: KFP component wrappers around `components.<step>.run`
(`pipeline.kfp_components`), what they do around that call (`pipeline.publish`: services,
artifact metadata, KFP metrics), the pipeline function (`pipeline.pipeline`), data
materialisation (`pipeline.data`), Kubeflow Trainer TrainJobs (`pipeline.trainjob`) and the
`skinlesion pipeline compile|submit|run-local|train-job` command (`pipeline.cli`).

Nothing is defined here on purpose: the container imports these modules at run time, and
code must not depend on this file being executed (an editable install made before it
existed treats `pipeline` as a namespace package).
"""
