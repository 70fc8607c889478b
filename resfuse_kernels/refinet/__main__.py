"""``python -m resfuse_kernels.refinet [STEP ...]``: the RefiNet pipeline.

Steps: level1, score, cluster, level2, evaluate, all (the default), report
(re-render the reports of a finished run). See :mod:`.pipeline`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from .pipeline import STEPS, Config, Run, log


def parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m resfuse_kernels.refinet",
        description="RefiNet (paper section 5): level 1, class affinity and clustering, "
                    "level-2 networks per cluster, evaluation and reports. Synthetic data "
                    "(20 classes = 4 shapes x 5 stripe orientations) unless --data is given. "
                    "Each step is checkpointed in --run and skipped when already done.")
    p.add_argument("steps", nargs="*", default=["all"], metavar="STEP",
                   help=f"{', '.join(STEPS)}, all (default), report")
    p.add_argument("--run", default=d.run, help="run directory (default %(default)s)")
    p.add_argument("--force", action="store_true", help="redo the named steps even if done")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="a Tiny-ImageNet folder (wnids.txt, train/, val/, words.txt)")
    g.add_argument("--classes", type=int, default=d.classes,
                   help="Tiny-ImageNet classes (first N of wnids.txt)")
    g.add_argument("--train-limit", type=int,
                   help="Tiny-ImageNet: at most this many training images")
    g.add_argument("--eval-limit", type=int,
                   help="Tiny-ImageNet: at most this many validation (and test) images")
    g.add_argument("--per-class", type=int, default=d.per_class,
                   help="synthetic training images per class")
    g.add_argument("--eval-per-class", type=int, default=d.eval_per_class,
                   help="synthetic validation and test images per class")
    g.add_argument("--size", type=int, default=d.size, help="synthetic image size")
    g = p.add_argument_group("level 1")
    g.add_argument("--arch", help="small, resnet19, resfuse19, highway19, resnet25, "
                                  "resfuse25, resnet34, vgg16, vgg16_bn "
                                  "(default: small; resfuse19 with --data)")
    g.add_argument("--split", type=int, help="trunk end: stages (package nets, default 1) or "
                                             "features index (VGG, default conv4_3)")
    g.add_argument("--weights", help="a state_dict file to start level 1 from (never downloaded)")
    g.add_argument("--caffe", action="store_true", help="VGG: Caffe weights (BGR, 0..255, means)")
    g.add_argument("--resize", action="store_true", help="VGG: resize to 256, centre crop 224")
    g.add_argument("--level1-epochs", type=int, default=d.level1_epochs)
    g.add_argument("--level1-lr", type=float, default=d.level1_lr)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g = p.add_argument_group("hierarchy")
    g.add_argument("--k", type=int, default=d.k, help="clusters (default %(default)s)")
    g.add_argument("--method", default=d.method,
                   help="spectral, agglomerative, affinity_propagation, kmedoids")
    g.add_argument("--affinity", default=d.affinity, help="eq6 (scores) or eq7 (confusion matrix)")
    g.add_argument("--assign-labels", default=d.assign_labels,
                   help="spectral: kmeans, discretize, cluster_qr")
    g.add_argument("--ks", type=int, nargs="+", default=list(d.ks), help="K values of Figure 9a")
    g.add_argument("--max-size", type=int,
                   help="also split clusters until each has at most this many classes")
    g = p.add_argument_group("level 2")
    g.add_argument("--level2-epochs", type=int, default=d.level2_epochs)
    g.add_argument("--level2-lr", type=float, default=d.level2_lr)
    g.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs,
                   help="epochs of level 1's cluster classifier (L2 + retrain)")
    g.add_argument("--soft-top", type=int, default=d.soft_top,
                   help="soft: at most this many heads per image")
    g.add_argument("--soft-threshold", type=float, default=d.soft_threshold,
                   help="soft: heads of clusters at least this probable")
    g.add_argument("--tsne-limit", type=int, default=d.tsne_limit)
    g.add_argument("--seed", type=int, default=d.seed)
    return p


def config_from(args: argparse.Namespace) -> Config:
    names = {f.name for f in dataclasses.fields(Config)} - {"READS"}
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    values["ks"] = tuple(values["ks"])
    return Config(**values)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    unknown = sorted(set(args.steps) - {*STEPS, "all", "report"})
    if unknown:
        p.error(f"unknown steps {unknown}: choose from {', '.join(STEPS)}, all, report")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(config_from(args))
    start = time.perf_counter()
    if args.steps == ["report"]:
        from . import report
        for f in report.write(run.dir):
            log(f"wrote {run.dir / f}")
        return 0
    if "report" in args.steps:
        raise SystemExit("report re-renders a finished run: give it alone")
    targets = tuple(STEPS) if "all" in args.steps else tuple(args.steps)
    run.run(targets, force=targets if args.force else ())
    log(f"finished in {time.perf_counter() - start:.1f} s; reports in {run.dir / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
