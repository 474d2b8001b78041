"""Training internals, called by components/train.py: the loop (trainer.py), its two input
paths (batches.py: DataLoader, or device-resident images with gpu_augment.py), datasets,
samplers, class balancing (balance.py), transforms, losses, checkpoints, the output folder's
guard and the MLflow record (run_record.py). Several nodes on Kubeflow Trainer:
pipeline/trainjob.py."""
