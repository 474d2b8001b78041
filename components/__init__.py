"""The pipeline's components: one module per step at this level, each a `run(...)` taking
paths and its typed config (common/config.py) and returning a small dict, plus `main(argv)`
so that `python -m components.<step>` works. DVC (dvc.yaml), Kubeflow (pipeline/) and the
`skinlesion` command all call these same functions.

    preprocess     raw images -> resized once, with the labels of the images kept
    split          lesion-grouped (or the paper's image-level) train/val/test split
    class_weights  class weights and priors for the recipe's class balancing
    train          the hybrid model's training: checkpoints, EMA weights, an MLflow run
    evaluate       test metrics with intervals, tables and figures
    register       the EMA model as an MLflow registered model version (metric gate)

Below them, by concern (nothing there imports a step):

    common/      basics: params and configs, file names, atomic writes, labels, MLflow glue
    training/    the training loop and its inputs, samplers, losses, checkpoints
    evaluation/  metrics and plots
    registry/    the MLflow registry client, model cards, the served model
    commands/    commands that are not pipeline steps: promote, predict, serve, runs, exp,
                 demo, synth, info, and the `skinlesion` entry point (commands/cli.py)
"""
