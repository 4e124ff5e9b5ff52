"""Screen one variant of the full method (ours) on the quality study's budget (15 epochs, 4,000 images):

.venv/bin/python benchmarks/research/screen.py NAME IR SEED [cap=MAX_TAU_PLUS] [section.key=value ...]

Prints and appends to benchmarks/research/screen.jsonl: the head's CAA/ACC/tail acc, k-means on
the features, kNN acc. ``reseed.py`` reuses ``overrides`` and ``screen``.
"""
import json
import sys
import time

import torch
import yaml
from sklearn.cluster import KMeans

import jdcl_ray.engine as E
from jdcl_ray import bench, metrics
from jdcl_ray.losses import pooled_tau_plus


def overrides(args, base):
    """section.key=value arguments on top of ``base``; other arguments are returned apart."""
    rest = []
    for arg in args:
        key, _, value = arg.partition("=")
        if "." not in key:
            rest.append(arg)
            continue
        section, name = key.split(".")
        base.setdefault(section, {})[name] = yaml.safe_load(value)
    return base, rest


def screen(name, ir, seed, over, **extra):
    study = bench.Study(overrides={})
    cfg = bench.run_config(study, ir, seed, over)
    data = bench._subsample(E.prepare_data(cfg), study.max_images, seed)
    started = time.time()
    last, state = bench.train_once(cfg, data)
    model = E.build_model(cfg, state["in_channels"])
    model.load_state_dict(state["model"])
    out = E.embed(model, data.train.images, torch.device("cpu"))
    features = torch.nn.functional.normalize(out["features"], dim=1).numpy()
    k = cfg.model.num_clusters
    km = KMeans(k, n_init=3, random_state=seed).fit_predict(features)
    on_features = metrics.cluster_metrics(data.train.labels, km, k, class_order=data.class_order)
    row = dict(name=name, ir=ir, seed=seed, **extra, wall=round(time.time() - started),
               head_caa=last["train/caa"], head_acc=last["train/acc"], tail=last["train/tail_acc"],
               km_caa=on_features["caa"], km_acc=on_features["acc"], knn=last["knn_acc"],
               sizes=sorted(last["predicted_sizes"], reverse=True), dcl=last["loss/dcl"])
    print(json.dumps(row))
    with open("benchmarks/research/screen.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    over, rest = overrides(sys.argv[4:], {"loss": {"prior": "pooled"}, "eval": {"assign": "head"}})
    cap = next((float(a.split("=", 1)[1]) for a in rest if a.startswith("cap=")), None)
    if cap is not None:
        E.pooled_tau_plus = lambda a, p: pooled_tau_plus(a, p).clamp_max(cap)
    screen(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), over)
