"""Fine-tune a registry model end to end on chest X-ray images; its checkpoints feed jobs/extract.py.

    python jobs/fine_tune.py --dataset nih --metadata Data_Entry_2017.csv --images images/ \
        --backbone densenet121 --weights imagenet --out runs/nih-densenet121-ft
    python jobs/fine_tune.py --config conf/finetune.toml --num-processes 4 --out runs/x   # TorchDistributor

The driver builds the same image table as the extraction job (metadata, located images,
patient-level splits), then trains: in this process with --num-processes 1 (no Spark), or as
N data-parallel processes started by Spark's TorchDistributor (local mode on this machine, or
barrier tasks on a cluster's executors). A run directory that holds an interrupted run's
last.pt is resumed. The best checkpoint is then evaluated on val and test with the head
trainer's metrics, CAM localization is scored against NIH's boxes when --bbox-list is given,
and the run directory gets the same files and report as a head run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.choices import ARCHITECTURE_LAYOUTS, CALIBRATION_METHODS, PRECISIONS, SPLITS
from common.config import (ConfigError, HelpFormatter, add_adam_flags, add_loss_flags, parse_list, parse_with_config,
                           require)
from common.images.data_config import RESIZE_MODES
from common.runs.command import command_line, run_command
from common.runs.safe_output import check_dir_path
from common.data.table_flags import add_table_flags, check_table_flags
from common.data.targets import FINETUNE_POLICIES
from common.evaluation.age_bands import add_flag as add_age_bands_flag, parse_age_bands
from common.evaluation.operating_points import add_flag as add_operating_point_flag, parse_targets
from finetune.choices import BEST_METRICS, MODELS, POOLINGS, SCHEDULES, model_options
from finetune.settings import FinetuneSettings, scratch_defaults
from jobs import workers_run_this_python

# torch and Spark are imported by the functions that use them, so that --help (and a flag error)
# answers at once.

PROG = "jobs/fine_tune.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--config", help="TOML file whose [finetune] table sets defaults for these flags (e.g. conf/finetune.toml)")
    a("--out", help="run directory; an interrupted run there is resumed")
    a("--overwrite", action="store_true", help="replace a finished (or interrupted) run at --out")
    g = p.add_argument_group("images and their patient-level split (as jobs/extract.py)")
    add_table_flags(g)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="densenet121", help="registry name, e.g. densenet121, resnet50, inception_v3")
    g.add_argument("--weights", default="imagenet",
                   help="starting weights: imagenet[:ENUM], pretrained (timm, torchxrayvision backbones), a checkpoint path "
                        "(a fine-tune checkpoint too), or random[:SEED]")
    g.add_argument("--download-weights", action="store_true", help="fetch the published weights if not cached")
    g.add_argument("--input-size", type=int, default=None,
                   help="network input size (default: the backbone's, e.g. 224; a fine-tune checkpoint's own)")
    g.add_argument("--resize", choices=RESIZE_MODES, default=None,
                   help="how a non-square image becomes square: pad (aspect kept, nothing cut), crop, stretch "
                        "(default: pad, or a fine-tune checkpoint's own)")
    g.add_argument("--freeze-backbone", action="store_true", help="train the new head only (the backbone stays as loaded)")
    g.add_argument("--model", choices=MODELS, default="classifier",
                   help="classifier: backbone + Linear; wang2017: transition layer + pooling (Wang et al. 2017); "
                        "space-attention; attention-gated (ResNet-50, Schlemper et al.); bilinear: two streams, "
                        "bilinear pooling, CE + MSML (Ge et al. 2018)")
    g.add_argument("--pooling", choices=POOLINGS, help="wang2017: global pooling of the transition maps (default lse)")
    g.add_argument("--lse-r", type=float, help="wang2017: r of log-sum-exp pooling (default 10)")
    g.add_argument("--transition-channels", type=int, help="wang2017: channels of the transition layer (default 1024)")
    g.add_argument("--space-kernel", type=int, help="space-attention: kernel of the class-map convolution (default 3)")
    g.add_argument("--gate-channels", type=int, help="attention-gated: inner channels of each gate (default 256)")
    g.add_argument("--bilinear-dim", type=int, help="bilinear: channels each stream is reduced to before the outer "
                                                    "product (default 256)")
    g.add_argument("--bilinear-alpha", type=float, help="bilinear: weight of MSML + CE (default 0.2)")
    g.add_argument("--bilinear-beta", type=float, help="bilinear: weight of the fine-grained CE (default 0.6)")
    g = p.add_argument_group("labels and loss (as heads.train)")
    g.add_argument("--labels", default="all", help="all | competition (CheXpert's five) | comma-separated names")
    g.add_argument("--keep-no-finding", action="store_true", help="also train on a 'No Finding' label")
    g.add_argument("--policy", default="ignore", help=f"uncertain (-1) labels: {' | '.join(FINETUNE_POLICIES)}")
    add_loss_flags(g)
    _add_optimization_flags(p.add_argument_group("optimization"))
    g = p.add_argument_group("machine")
    g.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes; >1 runs through Spark's TorchDistributor")
    g.add_argument("--local-mode", action=argparse.BooleanOptionalAction, default=True,
                   help="TorchDistributor: all processes on this machine (else one per Spark task on the executors)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA where this machine (local mode) or the Spark tasks (cluster) have GPUs")
    g.add_argument("--precision", default="auto", help=f"{' | '.join(PRECISIONS)}; auto: fp16 on CUDA, bf16 on a CPU "
                                                       "with native bf16, else fp32 (autocast; weights stay fp32)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader processes decoding images, per process")
    g.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    g.add_argument("--decode-cache", metavar="DIR", default=None,
                   help="where train and val images are kept decoded at the input size (float32, memory-mapped; "
                        "built once, shared by ranks, resumes and runs of the same data config); "
                        "default: decode-cache/ beside --out (in its parent folder): point it at a fast disk with room")
    g.add_argument("--no-decode-cache", action="store_true", help="decode every image every epoch instead")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between last.pt saves (and every epoch end)")
    g.add_argument("--checkpoint-ensemble", type=int, default=0,
                   help="keep every epoch's checkpoint (checkpoints/epoch-NNN.pt) and also score the mean of the N best "
                        "by --best-metric (the CheXpert paper's checkpoint ensemble); 0: none")
    g.add_argument("--log-every", type=int, default=50, help="steps between progress lines within an epoch; 0: none")
    g.add_argument("--log-seconds", type=float, default=30.0,
                   help="also a progress line when this many seconds passed since the last (slow epochs); 0: none")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop after this many steps, with last.pt saved; the same command resumes (time-boxed jobs)")
    g = p.add_argument_group("localization")
    g.add_argument("--bbox-list", help="NIH BBox_List_2017.csv: score CAM boxes of the images that have boxes")
    g.add_argument("--localize-split", choices=SPLITS, default="test",
                   help="the split whose boxed images are scored (boxes of training images flatter the model)")
    g.add_argument("--overlays", type=int, default=8, help="heatmap overlays saved as PNG (first images with boxes)")
    _add_evaluation_flags(p.add_argument_group("evaluation"))
    return p


def _add_optimization_flags(g) -> None:
    """Adam, the schedule and the epoch choice; lr, best metric and patience unset resolve by the starting
    weights (finetune.settings.resolve_defaults)."""
    add_adam_flags(g, lr=None, batch_size=16, epochs=20, per="step and process",
                   lr_help=f"Adam learning rate (default {scratch_defaults(True)['lr']:g} from random weights, "
                           f"{scratch_defaults(False)['lr']:g} from pretrained ones)")
    g.add_argument("--schedule", default="plateau",
                   help=f"{' | '.join(SCHEDULES)}: ReduceLROnPlateau on the best metric, or x lr-factor every "
                        "step-epochs")
    g.add_argument("--lr-factor", type=float, default=0.1, help="learning-rate multiplier of either schedule")
    g.add_argument("--step-epochs", type=int, default=10, help="step schedule: epochs between decays")
    g.add_argument("--plateau-patience", type=int, default=1,
                   help="plateau schedule: epochs without a better best metric")
    scratch, tuned = scratch_defaults(True), scratch_defaults(False)
    g.add_argument("--early-stop-patience", type=int, default=None,
                   help=f"epochs without a better best-metric; 0 = never (default {scratch['early_stop_patience']} "
                        f"from random weights, {tuned['early_stop_patience']} from pretrained ones)")
    g.add_argument("--best-metric", default=None,
                   help=f"{' | '.join(BEST_METRICS)}: picks best.pt, early stopping and the plateau schedule "
                        f"(default {scratch['best_metric']} from random weights, {tuned['best_metric']} from "
                        "pretrained ones)")
    g.add_argument("--train-seed", type=int, default=0, help="classifier init, batch order, augmentation")


def _add_evaluation_flags(g) -> None:
    add_age_bands_flag(g)
    g.add_argument("--calibrate", default="none",
                   help=f"{' | '.join(CALIBRATION_METHODS)}; temperature: fit one temperature per class on val with "
                        "best.pt (NLL), write calibration.json, report ECE before and after; predict and the service "
                        "then output calibrated probabilities")
    add_operating_point_flag(g)


def settings_from(args: argparse.Namespace) -> FinetuneSettings:
    """The run's settings from the parsed flags, refused before any work when bad; `args` is left as parsed."""
    check_table_flags(args)
    require(args, "out")
    for key, allowed in (("policy", FINETUNE_POLICIES), ("schedule", SCHEDULES), ("best_metric", BEST_METRICS),
                         ("precision", PRECISIONS), ("calibrate", CALIBRATION_METHODS)):
        if getattr(args, key) not in allowed and not (key == "best_metric" and args.best_metric is None):
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(args, key)!r}: choose from {', '.join(allowed)}")
    if args.checkpoint_ensemble == 1 or args.checkpoint_ensemble < 0:
        raise ConfigError(f"--checkpoint-ensemble {args.checkpoint_ensemble}: 0 (none) or at least 2 checkpoints")
    for key in ("batch_size", "epochs", "num_processes", "input_size", "step_epochs"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    try:
        options = model_options(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    layouts = ARCHITECTURE_LAYOUTS
    if args.model != "classifier" and args.backbone not in layouts:
        raise ConfigError(f"--model {args.model}: needs --backbone {', '.join(layouts)}, not {args.backbone}")
    if args.policy == "multiclass" and args.model == "bilinear":
        raise ConfigError("--policy multiclass: not with --model bilinear, whose MSML and CE terms are per label")
    if args.model == "attention-gated" and layouts.get(args.backbone) != "resnet50":
        raise ConfigError(f"--model attention-gated: gates a ResNet's stages; --backbone resnet50, not {args.backbone}")
    if args.decode_cache and args.no_decode_cache:
        raise ConfigError("--decode-cache and --no-decode-cache: give one")
    betas = tuple(parse_list(args.betas, float, "betas"))
    if len(betas) != 2:
        raise ConfigError(f"--betas {list(betas)!r}: give two values")
    if args.device == "cuda" and not (args.num_processes > 1 and not args.local_mode):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device cuda: torch.cuda.is_available() is False here (torch {torch.__version__})")
    if args.bbox_list and args.model == "classifier":
        from common.models.cam import CAM_LAYERS

        if args.backbone not in CAM_LAYERS:
            raise ConfigError(f"--bbox-list: CAM is defined for {', '.join(CAM_LAYERS)}, not {args.backbone}")
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    return FinetuneSettings(**{**flags, "betas": betas, "age_bands": parse_age_bands(args.age_bands),
                               "operating_point": parse_targets(args.operating_point),
                               "model_options": tuple(options.items())})


def resolve_device(settings: FinetuneSettings) -> str:
    """cpu or cuda for the training processes; on a cluster (--no-local-mode) the executors decide."""
    import torch

    on_executors = settings.num_processes > 1 and not settings.local_mode
    if settings.device != "auto":
        return settings.device
    if on_executors:
        # TorchDistributor gives each task its GPUs when Spark's tasks have a GPU resource.
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        amount = spark.conf.get("spark.task.resource.gpu.amount", None) if spark else None
        return "cuda" if amount and float(amount) > 0 else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_spark(device: str):
    """This machine's Spark session; TorchDistributor's local mode takes GPUs from the driver's resources."""
    import torch
    from pyspark.sql import SparkSession

    workers_run_this_python()
    builder = (SparkSession.builder.appName("cxr-features finetune")
               .config("spark.ui.showConsoleProgress", "false"))
    if device == "cuda":
        script = Path(__file__).resolve().parents[1] / "conf" / "spark" / "gpu-discovery.sh"
        builder = (builder.config("spark.driver.resource.gpu.amount", str(torch.cuda.device_count()))
                   .config("spark.driver.resource.gpu.discoveryScript", str(script)))
    return builder.getOrCreate()


def launcher(settings: FinetuneSettings):
    """How training starts: this process for one, Spark's TorchDistributor for several."""
    if settings.num_processes == 1:
        return lambda train, cfg: train(cfg)

    def distribute(train, cfg):
        from pyspark.ml.torch.distributor import TorchDistributor

        return TorchDistributor(num_processes=settings.num_processes, local_mode=settings.local_mode,
                                use_gpu=cfg.device == "cuda").run(train, cfg)

    return distribute


def main(argv: list[str] | None = None, spark=None, prog: str = PROG) -> dict:
    """Run the job; `spark`: a session to run TorchDistributor on (else one is made for N > 1)."""
    settings = settings_from(parse_with_config(build_parser(prog), argv, "finetune"))
    check_dir_path(settings.out)

    import torch

    from finetune.run import run

    command = command_line(prog, argv)

    def device() -> str:
        if spark is None and settings.num_processes > 1:  # TorchDistributor runs on the active session
            on_gpu = settings.local_mode and settings.device != "cpu" and torch.cuda.is_available()
            get_spark("cuda" if on_gpu else "cpu")
        return resolve_device(settings)

    return run(settings, command, device, launcher(settings))


def cli(argv: list[str] | None = None, prog: str = PROG) -> dict | None:
    return run_command(main, argv, prog)


if __name__ == "__main__":
    cli()
