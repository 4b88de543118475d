"""The maths of evaluation, as functions of tensors and modules: no files, checkpoints or options."""
