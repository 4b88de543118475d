"""The arguments and options of the `hssl` commands, as Typer types: each flag with its help text (what
`hssl CMD --help` shows) and the ranges Typer checks. cli.py's command signatures use them with their
defaults, as `options.<Name>`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hssl_cli.evaluate.measures.collapse_verdict import VERDICT_RULE

# shared by several commands
Verify = Annotated[bool, typer.Option(
    "--verify/--no-verify", help="Check the checkpoint's tensors against the checksum in its metadata "
    "(--no-verify skips it: faster on large files).")]
CheckpointArgument = Annotated[Path, typer.Argument(
    metavar="CKPT", help="A model checkpoint or run folder. Example: checkpoints/quickstart/<run>/last.safetensors",
    show_default=False)]
Dataset = Annotated[str | None, typer.Option(
    "--dataset", help="Use another dataset than the checkpoint's (digits, mnist, cifar10, cifar100, cifar100_coarse "
    "(its 20 superclasses), stl10, imagefolder, shards). Example: --dataset cifar100 --data-root ~/data/cifar100")]
DataRoot = Annotated[str | None, typer.Option(
    "--data-root", help="Folder of the dataset files (default: the checkpoint's data.root).")]
Device = Annotated[str, typer.Option(
    "--device", help="cpu, cuda or auto (cuda when one is visible). Example: --device cpu")]

# hssl pretrain
RecipeArgument = Annotated[Path, typer.Argument(
    metavar="RECIPE", help="Recipe YAML. Example: recipes/quickstart.yaml", show_default=False)]
RecipeOverrides = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe key, typed by the schema; repeatable. "
    "Example: --set optim.lr=0.2 --set train.epochs=5")]
RunsRoot = Annotated[Path, typer.Option(
    "--output", help="Root of run folders: <output>/<recipe name>/<timestamp>/. Example: --output /scratch/runs")]
Resume = Annotated[str | None, typer.Option(
    "--resume", help="Continue a killed run: a run folder, its last.safetensors, or 'auto' (the newest "
    "complete run of this recipe under --output, or a new run when there is none yet: what a requeued "
    "job wants). The recipe must match the run's. Example: --resume auto")]
InitFrom = Annotated[Path | None, typer.Option(
    "--init-from", help="Start a new run from weights; the optimiser, the schedule and the step start afresh. "
    "Either an hssl checkpoint (the whole model; the recipe must build the same architecture): a longer run, or "
    "the model under other training keys. Example: --init-from checkpoints/run/<run>/last.safetensors. "
    "Or a library backbone's weights (a timm/torchvision model's state_dict as .safetensors, or .pth/.pt read "
    "with torch.load(weights_only=True)): domain-adaptive pretraining from e.g. ImageNet weights; they fill "
    "the backbone only (keys and shapes must match model.backbone; the library's classifier is left out) and "
    "the heads start fresh. Example, with model.backbone: timm:resnet18 and a file written by "
    "torch.save(timm.create_model('resnet18', pretrained=True).state_dict(), 'resnet18.pth'): "
    "--init-from resnet18.pth")]
CheckOnly = Annotated[bool, typer.Option(
    "--check", help="Validate the recipe (with --set) and print it resolved, every default filled in, "
    "as YAML; train nothing.")]

# hssl probe
Features = Annotated[str, typer.Option(
    "--features", help="backbone (f(x), the usual choice) or projector (the method's embedding of one view, "
    "as its loss sees it: g(f(x)), or the head on one fibre for H-SSL).")]
TrainSamples = Annotated[int | None, typer.Option(
    "--train-samples", "--train-subset", help="Fit the probes on a fixed random subset of train (default: all): "
    "a quick probe of a large split. Example: --train-samples 6000")]
TestSamples = Annotated[int | None, typer.Option(
    "--test-samples", "--test-subset", help="Score on a fixed random subset of test (default: all). "
    "Example: --test-samples 3000")]
LabelPercentage = Annotated[str, typer.Option(
    "--labels", help="Low-label evaluation: keep this percentage of each class's train labels (a fixed, seeded "
    "subset, the same for every checkpoint). Example: --labels 1%")]
Protocol = Annotated[str, typer.Option(
    "--protocol", help="fast: L-BFGS softmax regression on standardised features of unaugmented images (one "
    "backbone pass; seconds). standard: the papers' linear evaluation, SGD on features of crop+flip views drawn "
    "every epoch (one backbone pass per image per epoch). finetune: the backbone and a linear head trained end to "
    "end on crop+flip views (after SimCLR/BYOL's semi-supervised protocol; with --labels 1% or 10%); not comparable "
    "with the frozen protocols. standard and finetune read --epochs, --lr, --batch-size, --weight-decay.")]
Epochs = Annotated[int | None, typer.Option(
    "--epochs", help="--protocol standard / finetune: epochs of training (default 100 / 30).")]
LearningRate = Annotated[float | None, typer.Option(
    "--lr", help="--protocol standard / finetune: learning rate (of the head, for finetune) for batch 256, scaled "
    "linearly with --batch-size; cosine schedule (default 0.1 / 0.05 with SGD, 1e-3 with AdamW).")]
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", help="--protocol standard / finetune: images per step (default 256).")]
WeightDecay = Annotated[float | None, typer.Option(
    "--weight-decay", help="--protocol standard / finetune: weight decay (default 0).")]
BackboneLrScale = Annotated[float | None, typer.Option(
    "--backbone-lr-scale", help="--protocol finetune: the backbone's learning rate as a multiple of the head's "
    "(default 0.1: the pretrained features are adapted, not overwritten; 1: one rate for all).")]
Optimizer = Annotated[str | None, typer.Option(
    "--optimizer", help="--protocol finetune: sgd (Nesterov momentum 0.9, the default) or adamw.")]
TestRotation = Annotated[list[float] | None, typer.Option(
    "--test-rotation", help="Also score the same probes on the test images rotated by this angle in degrees "
    "(bilinear); repeatable. Example: --test-rotation 17 --test-rotation 100")]
Validation = Annotated[bool, typer.Option(
    "--validation", help="Score on held-out train images (--test-samples of them, default 10%), never on "
    "test: the split to choose settings on.")]
FeatureCache = Annotated[bool, typer.Option(
    "--cache/--no-cache", help="Keep the extracted features (safetensors in $HSSL_CACHE_DIR/features, default "
    "~/.cache/hssl/features, keyed by a hash of the weights and the images), so the next probe of the same "
    "checkpoint and data skips the extraction.")]
ExactKernelKnn = Annotated[bool, typer.Option(
    "--exact-kernel-knn", help="Kernel-regime checkpoints (method kernel): also a kNN whose similarity is the "
    "base kernel itself, evaluated exactly on the normalised pixels (random Fourier features: the RBF kernel "
    "they approximate): knn_k20_exact_kernel, knn_k200_exact_kernel.")]
Augmentation = Annotated[bool, typer.Option(
    "--augmentation", help="Instead of the class labels, predict each view's augmentation parameters a_t "
    "(crop box, flip, jitter factors, ...) from [f(x), f(t(x))]: ridge regression on --train-samples train "
    "images (default 4096), R² per parameter on the held-out half. Near 0: the features are invariant to "
    "the augmentation; EquiMod's claim is that its features keep it.")]
ProbeJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")]

# hssl collapse-report (its help names the verdict rule, so it is not a docstring)
COLLAPSE_REPORT_HELP = f"""Is the representation collapsing? Covariance spectra of a checkpoint's layers.

    On a fixed sample of images (no augmentation), each layer the method has (backbone features f(x), \
projector output z, predictor output q(z)) gets: effective rank (exp of the entropy of the normalised \
eigenvalues of the standardised features, i.e. of the correlation matrix: what a linear probe sees; the raw \
covariance's is shown too), RankMe (on the singular values of the uncentred embeddings), participation \
ratio, the mean std of L2-normalised embeddings next to the healthy 1/sqrt(D), the number of correlation \
eigenvalues below THRESHOLD x the largest, and a verdict. Where there is a predictor (BYOL, DirectPred, \
IsoLoss): the alignment of its eigenvectors with those of the correlation z^T z / N (1: aligned).

    Verdict rule, per layer: {VERDICT_RULE}. The checkpoint's verdict is its projector's (the backbone's \
when there is no projector).

    Several checkpoints (a run's epochs, or methods side by side): a table each, and with --plot one figure \
with their spectra overlaid per layer, on the same data sample.

    Examples: hssl collapse-report checkpoints/quickstart/20261123-120000/last.safetensors --plot spectrum.png; \
hssl collapse-report RUN/epoch-0010.safetensors RUN/epoch-0100.safetensors --plot spectra.pdf
"""
CheckpointsArgument = Annotated[list[Path], typer.Argument(
    metavar="CKPT...", show_default=False,
    help="Model checkpoints or run folders. Example: checkpoints/quickstart/<run>/last.safetensors")]
SampleSplit = Annotated[str | None, typer.Option(
    "--split", help="Split to sample (default: the data's test split). Example: --split train")]
CollapseSamples = Annotated[int, typer.Option(
    "--samples", help="Images in the sample (fewer when the split is smaller); at least the layer width "
    "D, or only N-1 eigenvalues exist. Example: --samples 4096")]
Threshold = Annotated[float, typer.Option(
    "--threshold", help="An eigenvalue below this fraction of the largest counts as a collapsed dimension. "
    "Example: --threshold 1e-4")]
SpectrumPlot = Annotated[Path | None, typer.Option(
    "--plot", help="Write a figure (.png, .pdf or .svg): one log-scale panel per layer, the spectra of every "
    "checkpoint overlaid, titled with the dataset. Example: --plot spectra.pdf")]
CheckpointLabel = Annotated[list[str] | None, typer.Option(
    "--label", help="The legend label of each checkpoint, in order (default: method, backbone, epoch); "
    "repeatable. Example: --label SimCLR --label BYOL")]
SharedAxes = Annotated[bool, typer.Option(
    "--shared-axes/--separate-axes", help="Panels share their y-axis (compare layers at a glance) or each "
    "gets its own range.")]
CollapseJson = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object (with the eigenvalues; a list for several checkpoints) instead of the "
    "table.")]

# hssl export
ExportOut = Annotated[Path, typer.Option(
    "--out", help="The .safetensors file to write. Example: --out backbone.safetensors", show_default=False)]
ExportFormat = Annotated[str, typer.Option(
    "--format", help="plain: the backbone's state_dict for hssl_cli.load_backbone / build_backbone; torchvision "
    "or timm (resnet18_cifar only): the same tensors under those libraries' ResNet-18 names.")]

# hssl shards
ImageFolderArgument = Annotated[Path, typer.Argument(
    help="An image folder: <folder>/<split>/<class>/*.jpg|png (the imagefolder layout), or a folder of "
    "images (one unlabeled split, train).", show_default=False)]
ShardsFolderArgument = Annotated[Path, typer.Argument(
    help="The folder to write the shards and manifest.json into.", show_default=False)]
ShardsSplit = Annotated[list[str] | None, typer.Option(
    "--split", help="Pack only this split; repeatable (default: every split). Example: --split train")]
ResizeTo = Annotated[int | None, typer.Option(
    "--size", min=8, max=4096, help="Pre-resize every image to SIZE x SIZE (antialiased bilinear, as "
    "training resizes) and store it as PNG (lossless); default: the files' own bytes.")]
PerShard = Annotated[int, typer.Option(
    "--per-shard", min=1, help="Images per shard (the last may hold fewer).")]

# hssl plot
RunsArgument = Annotated[list[Path], typer.Argument(
    metavar="RUN...", help="Run folders, checkpoints in them, or folders of runs (all runs below). "
    "Example: checkpoints/quickstart/20261203-065817 checkpoints/simclr_cifar10", show_default=False)]
FigureOut = Annotated[Path, typer.Option(
    "--out", help="The figure: .png, .pdf or .svg. Example: --out curves.pdf")]
Panels = Annotated[list[str] | None, typer.Option(
    "--metric", help="Panels to draw: metric names of metrics.jsonl, * as a wildcard; repeatable "
    "(default: loss, lr, monitor/*, diagnostics/*/effective_rank). Example: --metric 'diagnostics/*/rankme'")]
RunLabel = Annotated[list[str] | None, typer.Option(
    "--label", help="A legend label per run, in order (default: <recipe name>/<run folder>); repeatable.")]
FigureTitle = Annotated[str | None, typer.Option("--title", help="The figure's title.")]

# hssl equivariance-check
OptionalCheckpointArgument = Annotated[Path | None, typer.Argument(
    metavar="[CKPT]", help="A model checkpoint or run folder (or use --recipe). "
    "Example: checkpoints/hssl_rotmnist_c8/<run>/last.safetensors", show_default=False)]
CheckRecipe = Annotated[Path | None, typer.Option(
    "--recipe", help="Check the untrained model that a recipe builds instead of a checkpoint: an architecture "
    "check before spending GPU time. Example: --recipe recipes/hssl_rotmnist_c8.yaml")]
TestGroup = Annotated[str | None, typer.Option(
    "--group", help="The rotations/flips to measure, C<N> or D<N> (default: the backbone's group; C4 for others). "
    "It chooses what is measured, not what is gated: an e2_* backbone's own group is gated whatever is tested, "
    "and only --expect-invariant gates other elements. Example: --group D4")]
ExpectInvariant = Annotated[bool, typer.Option(
    "--expect-invariant", help="Gate the pooled features' invariance under every exact element of the test group "
    "(rotations by multiples of 90 degrees, flips), for a backbone that does not promise it: you assert it, e.g. "
    "of a plain CNN trained to be invariant; without it those rows are measured and never fail. "
    "Example: --expect-invariant --group D4")]
EquivarianceSamples = Annotated[int, typer.Option(
    "--samples", help="Test images: a fixed random subset of the test split. Example: --samples 256")]
Tolerance = Annotated[float, typer.Option(
    "--tolerance", help="Exit code 1 when a gated error (a promised property at an exact element: multiples of "
    "90 degrees and flips, shifts by whole map cells, average-pooled scale levels) exceeds this. "
    "Example: --tolerance 1e-5")]
RecipeDataRoot = Annotated[str | None, typer.Option(
    "--data-root", help="Folder of the dataset files (default: the recipe's data.root).")]
EquivarianceJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the tables.")]

# hssl sweep
SuiteArgument = Annotated[Path, typer.Argument(
    metavar="SUITE", help="Suite YAML. Example: suites/hssl_rotmnist.yaml", show_default=False)]
CellIndex = Annotated[int | None, typer.Option(
    "--cell", help="Run only cell N (0-based, see --list): one SLURM array task or one job of a shell loop. "
    "Example: --cell $SLURM_ARRAY_TASK_ID")]
SuiteOverrides = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe key in every cell (after the suite's own overrides); repeatable. "
    "Example: --set data.root=~/data/mnist")]
ListCells = Annotated[bool, typer.Option("--list", help="List the cells and their status; run nothing.")]
ReportOnly = Annotated[bool, typer.Option(
    "--report", help="Run nothing: aggregate the finished cells into a table (mean ± std over seeds), "
    "written as report.md, report.csv and report.png beside the cells.")]
SweepJson = Annotated[bool, typer.Option("--json", help="With --report or --list: print JSON instead.")]
SuitesRoot = Annotated[Path, typer.Option(
    "--output", help="Root of suite folders: <output>/<suite name>/cells/<cell>/. "
    "Example: --output /scratch/sweeps")]
