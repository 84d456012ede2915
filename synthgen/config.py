"""Run settings as dataclasses. The CLI, config files and the Python API use the same names.

Each field's metadata carries its help text with the unit, which the CLI shows in --help.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def option(default: Any, help: str, **kwargs) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TranscribeConfig:
    teacher: str = option("", "teacher: a folder from 'synthgen train-teacher', a .safetensors file (with "
                          "--teacher-factory), a TorchScript or a torch.export archive", required=True)
    out: str = option("runs/transcribe", "run folder to create (models, privacy report, metrics, sample grid)")
    teacher_factory: str | None = option(None, "package.module:function that builds the teacher architecture for .safetensors weights")
    teacher_meta: str | None = option(None, "JSON file with the teacher's metadata (input_shape, class_names, mean, std) "
                                      "for a teacher not trained by synthgen")
    trust_pickle: bool = option(False, "load a pickle teacher checkpoint; it can run any code it contains")
    private_data: str | None = option(None, "private training data (folder or Hub id); needed only when the teacher's "
                                      "metadata lacks the dataset fingerprint and size")
    eval_data: str | None = option(None, "data with a real test split to measure student accuracy (evaluation only)")
    eval_split: str = option("test", "split of --eval-data to evaluate on")

    mechanism: str = option("gaussian", "DP labelling: 'gaussian' (data-sensitive), 'noisy-label' (label-sensitive, "
                            "randomized response with the student prior), 'dp-teacher' (the teacher was trained with "
                            "DP-SGD: no noise, no per-query cost) or 'none' (no noise: NOT private)")
    epsilon: float = option(10.0, "target epsilon of the whole transcription, at --delta, for the privacy unit")
    delta: float = option(1e-5, "target delta; must be below 1/n for n private training examples")
    budget_epsilon: float | None = option(None, "cap on the total epsilon spent on this teacher (teacher-level) or dataset "
                                          "(example-level) over all runs; the run is rejected if it would exceed it")
    ledger: str | None = option(None, "privacy ledger (DuckDB file); default $SYNTHGEN_LEDGER or "
                                "~/.local/share/synthgen/ledger.duckdb")

    steps: int = option(2000, "training iterations; each sends --batch-size synthetic images to the teacher, so the "
                        "planned queries are steps x batch-size")
    batch_size: int = option(256, "synthetic images generated and labelled per iteration (one query each)")
    student_steps: int = option(1, "student updates per iteration")
    generator_steps: int = option(1, "generator updates per iteration")
    student_lr: float = option(1e-3, "student learning rate (Adam)")
    generator_lr: float = option(1e-3, "generator learning rate (Adam)")
    top_k: int = option(10, "classes per answer, the student's top-k (gaussian) or the largest set for randomized response")
    clip_norm: float = option(1.0, "L2 norm C each teacher's top-k probability vector is scaled to (gaussian)")
    temperature: float = option(1.0, "softmax temperature applied to teacher logits before answering")
    replay_size: int = option(50000, "answered images kept for re-use by the student (free post-processing); 0 disables")
    replay_batch: int = option(256, "images drawn from the replay buffer per student update")
    query_pool: int = option(1, "candidates per query: each iteration generates query-pool times the generator's "
                             "part of the batch and sends that part, the images the student is least sure of "
                             "(smallest margin between its two top classes), taken in turn from each class the "
                             "student predicts. 1: no selection. The choice uses the student and the generator only, "
                             "so it costs no privacy")
    student_shift: int = option(0, "largest random shift, in pixels along each axis, of the images in a student "
                                "update (borders reflected); 0: none. Free post-processing of the answers")
    pseudo_label_weight: float = option(0.0, "weight of the student's loss on its own confident predictions for all "
                                        "images the generator made in the iteration, sent or not, learnt on shifted "
                                        "copies; the labels come from the student, so this costs no privacy. 0: off")
    pseudo_label_threshold: float = option(0.95, "smallest student probability of a pseudo-label that is kept")
    procedural_fraction: float = option(0.0, "fraction of each query batch rendered as random pen strokes (1 to 3 "
                                        "curves) in place of generator images; made without any data, they are "
                                        "queries like the others. 0: off")
    stroke_prior_weight: float = option(0.0, "weight of a data-free image prior on the generator: a small critic "
                                        "learns to tell the generator's images from random pen strokes, and the "
                                        "generator is rewarded for images the critic takes for strokes. Suits "
                                        "handwriting-like data; it uses no teacher and no data, so it costs no "
                                        "privacy. 0: off")
    silhouette_prior_weight: float = option(0.0, "weight of a data-free image prior for clothing-like data: a critic "
                                            "learns to tell the generator's images from random filled silhouettes "
                                            "(mostly mirror-symmetric, shaded, on a dark background), and the "
                                            "generator is rewarded for images the critic takes for silhouettes. It "
                                            "uses no teacher and no data, so it costs no privacy. 0: off. Not "
                                            "together with stroke_prior_weight")
    latent_dim: int = option(100, "generator input size (z ~ N(0, I))")
    generator_width: int = option(32, "generator channel width")
    student_width: int = option(32, "student channel width")
    student_hidden: int = option(256, "student hidden layer size")
    student_norm: str = option("none", "student normalisation after each convolution: 'none' or 'group' (GroupNorm, "
                               "as in a DP-SGD teacher, so that a DP-SGD baseline can share the student's architecture)")
    student_frontend: str = option("pixels", "student front end: 'pixels' (a CNN) or 'scatter' (a fixed wavelet "
                                   "scattering transform and linear layers)")
    student_init: str = option("random", "'random', or 'teacher': the student starts as a copy of the teacher, with its "
                               "architecture (the student settings above are then unused). Only with --mechanism "
                               "dp-teacher, whose teacher is itself DP, so copying it is post-processing")
    onehot_weight: float = option(1.0, "generator loss: weight of the student's own-argmax cross-entropy")
    entropy_weight: float = option(5.0, "generator loss: weight of the class-balance (batch mean entropy) term")
    activation_weight: float = option(0.1, "generator loss: weight of the student feature activation term")
    adversarial_weight: float = option(1.0, "generator loss: weight of the term that seeks images where the student "
                                       "disagrees with the last DP labels")

    seed: int = option(0, "seed of the generator, the student and the latent draws (public)")
    noise_seed: int | None = option(None, "seed of the DP noise, for reproducible tests only: the guarantee assumes it is "
                                    "secret. Default: drawn from os.urandom")
    checkpoint_every: int = option(100, "iterations between checkpoints")
    eval_every: int = option(200, "iterations between student evaluations on --eval-data (0: only at the end)")
    eval_limit: int | None = option(None, "evaluate on at most this many test images (quick runs)")
    resume: bool = option(False, "continue the interrupted run in --out from its last checkpoint")
    stop_after: int | None = option(None, "stop after this many iterations as if interrupted (for tests of --resume)")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    device: str = option("auto", "'auto' (CUDA when available), 'cpu' or 'cuda[:N]'")


def config_fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file whose keys are the config's field names."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(error)}; fix the file") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}; fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


def _yaml_problem(error) -> str:
    """Describe a PyYAML error in one line: the problem and its 1-based line and column."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def build_config(cls, values: dict):
    known = {f.name for f in config_fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; see --help for the names")
    return cls(**values)


@dataclass
class TeacherTrainConfig:
    data: str = option("", "private training data: a folder of IDX, parquet or class-folder images, a Hub dataset id, "
                       "or mnist or fashion-mnist (the local copies synthgen finds or fetches)",
                       required=True)
    out: str = option("runs/teacher", "folder to write the teacher to (config, safetensors weights, metadata)")
    epochs: int = option(3, "passes over the private training split")
    batch_size: int = option(128, "examples per optimiser step")
    lr: float = option(1e-3, "learning rate of --optimizer (Adam or SGD)")
    width: int = option(32, "channel width of the CNN")
    hidden: int = option(128, "size of the hidden linear layer (0: none, only with --frontend scatter)")
    frontend: str = option("pixels", "'pixels': a CNN on the pixels; 'scatter': a fixed wavelet scattering transform "
                           "and linear layers (Tramer and Boneh 2021), stronger under DP-SGD at small epsilon")
    head: str = option("dense", "with --frontend scatter: 'dense' (linear layers) or 'conv' (two tanh convolutions "
                       "of --width and 2 x --width channels, then --hidden tanh units: the ScatterNet+CNN of Tramer and "
                       "Boneh 2021)")
    optimizer: str = option("adam", "'adam', or 'sgd' with momentum 0.9")
    seed: int = option(0, "seed of initialisation and data order")
    eval_split: str | None = option("test", "split to report test accuracy on (evaluation on private data); empty to skip")
    limit: int | None = option(None, "train on a random subset of this many examples (quick runs and tests)")
    dp: bool = option(False, "train with DP-SGD (Opacus): the teacher and everything transcribed from it are then "
                      "example-level (epsilon, delta)-DP")
    epsilon: float = option(1.0, "DP-SGD: target epsilon (replace-one, PLD accountant), at --delta")
    delta: float = option(1e-5, "DP-SGD: target delta; must be below 1/n")
    max_grad_norm: float = option(1.0, "DP-SGD: per-example gradient clipping norm C")
    physical_batch_size: int = option(256, "DP-SGD: examples per forward pass (memory); --batch-size is the expected "
                                      "logical batch of Poisson sampling")
    augment_multiplicity: int = option(1, "DP-SGD: augmented copies of every sampled example (random shifts of up "
                                       "to 2 pixels); each example's gradient is the mean over its copies before "
                                       "clipping, so the guarantee is unchanged. 1: no augmentation (pixels only)")
    weight_standardization: bool = option(False, "DP-SGD: standardise the convolutions' weights per output channel "
                                          "(pixels front end, which DP training builds with GroupNorm)")
    ema_decay: float = option(0.999, "DP-SGD: decay of the exponential moving average of the weights kept as the "
                              "teacher (free post-processing); 0 disables")
    ledger: str | None = option(None, "DP-SGD: privacy ledger (DuckDB file) that records the spend before training")
    checkpoint_every: int = option(50, "DP-SGD: optimizer steps between checkpoints in --out/private (also written at "
                                   "the end of every epoch); 0: only at epoch ends")
    overwrite: bool = option(False, "replace the teacher that --out already contains (a folder with other files is "
                             "never replaced)")
    resume: bool = option(False, "DP-SGD: continue the interrupted training in --out from its last checkpoint; the "
                          "ledger is not charged again")
    stop_after: int | None = option(None, "DP-SGD: stop after this many steps as if interrupted (for tests of --resume)")
    noise_seed: int | None = option(None, "DP-SGD: seed of the noise and of Poisson sampling, for reproducible tests "
                                    "only: the guarantee assumes both are secret. Default: drawn from os.urandom")


LIMIT_FIX = "omit --limit to train on every example"
THREADS_FIX = "omit --threads to let torch choose"


def check_int_option(flag: str, value: Any, minimum: int, fix: str = "") -> None:
    """Raise ValueError, naming `flag` and the value, unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        message = f"{flag} must be an integer >= {minimum}, got {value!r}"
        raise ValueError(f"{message}; {fix}" if fix else message)


def check_teacher_train_options(config: TeacherTrainConfig) -> None:
    """Raise ValueError for settings that train-teacher cannot use, before any data is loaded.

    The DP-SGD settings that depend on the dataset size, such as --delta, are checked once it is loaded.
    """
    check_int_option("--epochs", config.epochs, 1)
    check_int_option("--batch-size", config.batch_size, 1)
    if config.limit is not None:
        check_int_option("--limit", config.limit, 1, LIMIT_FIX)
    # Training without --dp keeps no average and ignores the decay, as it ignores the other DP-SGD settings.
    decay = config.ema_decay
    if config.dp and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1):
        raise ValueError(f"--ema-decay must be in [0, 1), got {decay!r}; pass for example 0.999, or 0 to keep no "
                         "average")


def check_transcribe_options(config: TranscribeConfig) -> None:
    """Raise ValueError for --threads and --eval-limit values that transcribe cannot use, before anything is loaded."""
    if config.threads is not None:
        check_int_option("--threads", config.threads, 1, THREADS_FIX)
    if config.eval_limit is not None:
        check_int_option("--eval-limit", config.eval_limit, 1, "omit --eval-limit to evaluate on every test image")
