"""Evaluation of trained (or freshly initialised) models, in three kinds of module:

- `commands/`: one module per evaluation command (probe, collapse-report, equivariance-check, export, plot and
  probe --augmentation); each that evaluates a model opens it with `opening.open_for_evaluation` (plot reads
  runs' logs), runs measures and returns the plain dict the CLI renders or prints as JSON;
- `measures/`: the maths, as functions of tensors and modules (linear and kNN probes, the papers' SGD linear
  evaluation, spectra and the collapse verdict, equivariance, translation and scale errors); no files, no
  checkpoints;
- the plumbing here: `opening` (checkpoint or recipe -> frozen method + evaluation data), `features` (batched
  frozen features), `forward_memory` (how many images one forward pass may take under a memory budget),
  `feature_cache`, `probe_data` (decoded or streamed splits), `subsets` (the fixed, seeded subsets every
  checkpoint is evaluated on) and `monitor` (the probes run between training epochs).
"""
