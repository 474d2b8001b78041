"""Training internals, called by components/train.py: the loop (trainer.py), its two input
paths (inputs.py: DataLoader, or device-resident images with gpu_augment.py), datasets,
samplers, transforms, losses, checkpoints, the output folder's guard and the MLflow record."""
