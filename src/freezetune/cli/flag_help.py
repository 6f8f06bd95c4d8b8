"""What ``freezetune train --help`` says of each ``TrainConfig`` field, and the sections it lists them under.

A field left at ``None`` by default means "decided for you": its help says what is decided, and no ``[default: None]``
is shown. A field with fixed choices has them appended by the CLI (``config.train_config.FIELD_CHOICES``).
"""

from __future__ import annotations

from freezetune.auto.plan import MAX_BUDGET_EPOCHS
from freezetune.config.options import (
    AUGMENTATIONS,
    AUTO_VAL_FRACTION,
    AUTO_VAL_MAX_PER_CLASS,
    DEVICES,
    FREEZE_KEYWORDS,
    LABEL_COLUMNS,
    MODEL_SOURCES,
    PRETRAINED_WEIGHTS,
    RANDOM_WEIGHTS,
    RECIPES,
    TEXT_COLUMNS,
    UNFREEZE_FORMS,
    AugPreset,
)
from freezetune.config.train_config import DEFAULT_EPOCHS


def _preset(name: str, aug: AugPreset) -> str:
    """An augmentation preset in words, from its parameters (``options.AUGMENTATIONS``)."""
    words = [f"crops of {100 * aug.crop_scale[0]:.0f}-100 %%"] if aug.crop_scale else []
    words += ["flips"] * (aug.flip_p > 0) + ["colour"] * bool(aug.color) + ["erasing"] * (aug.erase_p > 0)
    return f"{name} ({', '.join(words)})" if words else name


# The first field of each section of TrainConfig (in its order), and the section's title in --help
SECTIONS = {"model": "model", "data": "data", "freeze": "freezing", "epochs": "optimisation", "amp": "speed",
            "seed": "run"}  # fmt: skip

FIELD_HELP = {
    # model
    "model": " or ".join(f"{s}:NAME" for s in MODEL_SOURCES[:-1]) + f" or {MODEL_SOURCES[-1]}:DIR_OR_ID",
    "weights": f"{'|'.join(PRETRAINED_WEIGHTS)} (pretrained; packaged copy used offline), "
    f"{'|'.join(RANDOM_WEIGHTS)}, or a weights file",
    "img_size": "the side in pixels of the images the model sees (default: the model's pretrained input size)",
    "init": "a freezetune checkpoint whose weights (head included) start the run",
    "max_length": "a text model: the tokens a text keeps (longer texts are cut there and counted in the log; at most "
    "the model's positions: the default is cut to them)",
    "text_column": f"a text model: the CSV column of the texts (default: the one named {' or '.join(TEXT_COLUMNS)})",
    "label_column": f"a text model: the CSV column of the labels (default: the one named {' or '.join(LABEL_COLUMNS)})",
    # data
    "data": "image folder (DIR/train/<class>/*), CSV path,label, or IDX directory (MNIST/Fashion-MNIST); for a text "
    'model (hf:), a text,label CSV (or .tsv, or a .jsonl of {"text": ..., "label": ...} objects); a .tsv of '
    "path<TAB>label lists images too",
    "val_data": "the validation split, in a form --data takes (default: DATA's val/ folder, else images held out "
    "of the training data: see --val-split)",
    "val_split": "the share of each training class held out for validation, of the whole class (with --per-class: "
    "before its K images are drawn), at least one image of a class of two or more, so a small class gives more "
    "(default, when the data has no val/: "
    f"{AUTO_VAL_FRACTION:g}, 1 to {AUTO_VAL_MAX_PER_CLASS} images a class)",
    "per_class": "few-shot: K seeded training images per class (default: all)",
    "aug": "training augmentation: " + ", ".join(_preset(name, a) for name, a in AUGMENTATIONS.items()),
    "batch_size": "images or texts a step, or auto (the largest that fits the CUDA device)",
    "workers": "data loader processes (default: a few on CUDA, and on the CPU for image files; none on the CPU for "
    "data held in memory and for texts, and none where /dev/shm has under 256 MiB free, as a container's 64 MB)",
    "skip_bad": "train without the image files that cannot be read (listed in skipped.txt), rather than stop and name "
    "them; the pre-scan then decodes every image (slower), so corrupt compressed data is found too",
    "refit": "the automatically held-out validation images train too (best.pt = last epoch); default: the auto "
    "recipe's final run refits unless --early-stop or a plateau unfreeze needs validation",
    # freezing
    "freeze": f"auto (measured), {', '.join(FREEZE_KEYWORDS)}, N (first N stages, negative ok), stage names or "
    "globs, comma-separated",
    "recipe": "a named procedure: " + " | ".join(RECIPES) + " (last-K: the last K stages train); default: what "
    "--freeze says",
    "budget": "wall-clock budget for the auto recipe's trials, epochs and final test (the epochs it affords, at most --epochs "
    f"where given, else {MAX_BUDGET_EPOCHS}; the other candidates' trials only if it leaves time for them; shorter epochs where a "
    "pilot's pace says a trial and one epoch would not fit), e.g. 90s, 5m, 1h30m (a plain number is seconds; default: none)",
    "bn": "BatchNorm in frozen parts: frozen (eval statistics), affine (affine trains, statistics update), train "
    "(statistics update), affine-only (affine trains, eval statistics)",
    "bn_stats": "BatchNorm statistics in the parts that train: update (from each batch, PyTorch's training mode), "
    "frozen (held, as in the frozen parts; their scale and shift still train: small batches, a head fitted on frozen "
    "features) or auto (held in lp-ft's fine-tune, in gradual and in the auto recipe's run from a probed head, else "
    "update)",
    "frozen_dropout": "dropout, drop path and stochastic depth in the frozen stages before the first that trains: "
    "keep (drawn in training, as the model was built) or off (run as at inference, so the feature cache holds every "
    "frozen stage: faster where they are many, e.g. torchvision's EfficientNet or ConvNeXt; on a small set their "
    "noise can help: 0.65 points on digits)",
    "unfreeze": f"{' | '.join(UNFREEZE_FORMS)} (a plateau without mode follows --monitor; min_delta is in its units: "
    "val_acc and val_f1 are fractions, 0.005 = half a point); default: what starts frozen stays frozen",
    # optimisation
    "epochs": f"passes over the training set (or over --epoch-images of it); default: {DEFAULT_EPOCHS}, under --budget "
    f"as many as it affords, at most {MAX_BUDGET_EPOCHS}",
    "epoch_fraction": "each epoch trains on this random share of the training set (a new draw each epoch)",
    "epoch_images": "each epoch trains on at most this many random training images or texts (a large set's epochs "
    "made shorter; the LR schedule and --epochs count these epochs; beside --epoch-fraction, the fewer)",
    "optimizer": "the optimizer (AdamW and Adam fused)",
    "lr": "peak learning rate of the head and of every stage --stage-lrs and --decay leave alone",
    "stage_lrs": "per-stage LRs, e.g. 'layer4=1e-4,layer3=5e-5'; a glob sets several ('blocks.[4-6]=1e-4')",
    "decay": "LR of the stage at depth i below the head is lr / decay**i, decay >= 1 (default: every stage at --lr)",
    "weight_decay": "AdamW/SGD weight decay (biases, norm parameters and a model's declared no-decay ones get none)",
    "momentum": "SGD's momentum (Nesterov; --optimizer sgd only)",
    "scheduler": "the LR over the run: onecycle (rises to --lr, then anneals), cosine (anneals from --lr after "
    "--warmup-epochs), none (constant)",
    "warmup_epochs": "epochs the LR rises for (cosine: a linear ramp; onecycle: 0 keeps one-cycle's own rise)",
    "label_smoothing": "cross-entropy label smoothing (0: none)",
    "average_weights": "average the trainable weights over this last share of the run's steps; the average is the "
    "model after the last epoch (0: none; unset: 0.5 in the auto recipe's run of an image model, else none)",
    "class_weights": "imbalanced classes: balanced weighs the training loss by 1 / class frequency",
    "grad_clip": "clip the gradients' total norm to this (default: no clipping)",
    "skip_nonfinite": "batches an epoch whose loss is not finite pass without a step before the run stops (0: the "
    "first stops it, best.pt and last.pt intact)",
    # speed
    "amp": "mixed precision (auto: bf16/fp16 on CUDA, off on CPU)",
    "channels_last": "NHWC memory format (default: on for convnets)",
    "compile": "torch.compile the part that trains (worth it on a GPU for long runs; slow to start)",
    "cuda_graph": "on a CUDA device, replay the cached training step as a CUDA graph: a head-only step is launch-bound "
    "without (bf16/fp32; not with --grad-clip, --skip-nonfinite, torchrun or --compile)",
    "cache": "frozen-prefix feature cache (off: each batch runs the frozen prefix forward only, augmented afresh; "
    "auto: a run that draws fewer training images than a store holds streams the plain images it would hold)",
    "cache_views": "augmented views of each training image the feature cache holds (1: the image unaugmented)",
    "cache_dir": "keep feature caches here and reuse them across runs (the auto recipe: OUT/features); a read-only one is only read",
    "cache_at": "cut the feature cache at this frozen stage (default: the first stage that trains)",
    "decode": "where images are decoded and augmented (auto: on the GPU with a CUDA device)",
    "device": " | ".join(DEVICES),
    # run
    "seed": "random seed: the validation hold-out, the few-shot draw, the head's init, shuffling, augmentation (each "
    "image's own, whatever --workers: the same seed repeats a run on the same machine)",
    "out": "run directory (default runs/MODEL-TIMESTAMP)",
    "resume": "continue the run in --out from its last.pt, with its own settings",
    "early_stop": "stop after PATIENCE epochs without improvement of --monitor (counted once the LR warm-up ends, "
    "and again from each unfreeze: a stage just opened gets the whole patience, so under --recipe gradual it stops "
    "PATIENCE epochs after the last stage opens at the earliest; default: off)",
    "save_every_steps": "also save last.pt every N training steps (resumable mid-epoch; one process: refused under "
    "torchrun; default: at each epoch's end)",
    "monitor": "what picks best.pt (a tie, or an accuracy within the validation split's noise of the highest: the "
    "lower val_loss; val_acc for val_loss) and drives --early-stop and a plateau "
    "unfreeze; val_f1 (macro-F1: each class counts alike, for imbalanced classes) also compares the auto recipe's "
    "trials",
    "tensorboard": "write TensorBoard event files in the run directory",
    "progress": "progress bars (redirected to a file or a pipe: a line a minute at most)",
    "final_test": "score best.pt on the test split when the run ends",
}
