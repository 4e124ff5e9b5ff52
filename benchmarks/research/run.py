"""Train one recipe with the engine's fit (monkeypatched variants), dump features, log results.

taskset -c 1 env OMP_NUM_THREADS=1 python run.py --name NAME --ir 10 --epochs 15 [--l2 prior] ...
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.cluster import KMeans

torch.set_num_threads(1)
import jdcl_ray.engine as E  # noqa: E402
import jdcl_ray.models as M  # noqa: E402
from jdcl_ray import metrics  # noqa: E402
from jdcl_ray.config import load_config  # noqa: E402

import variants as V  # noqa: E402

OUT = "/work/main/benchmarks/research/out"
RESULTS = "/work/main/benchmarks/research/results.jsonl"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--ir", type=float, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--l2", default="uniform")
    p.add_argument("--l2w", type=float, default=1.0)
    p.add_argument("--detach", action="store_true")
    p.add_argument("--set", action="append", default=[], help="section.key=yamlvalue")
    a = p.parse_args()
    import yaml
    over = {"data": {"imbalance_ratio": a.ir, "seed": a.seed}, "run": {"epochs": a.epochs, "seed": a.seed},
            "eval": {"every": 1000}}
    for s in a.set:
        k, v = s.split("=", 1)
        sec, key = k.split(".")
        over.setdefault(sec, {})[key] = yaml.safe_load(v)
    config = load_config("/work/main/configs/fashion_lt.yaml", over)
    V.OPTS.update(l2_mode=a.l2, l2_weight=a.l2w)
    E.joint_loss = V.joint_loss_variant
    if a.detach:
        M.JointModel.forward = V.joint_forward_detached
    captured = {}
    orig_eval = E.evaluate

    def ev(model, data, cfg, device):
        captured["model"] = model
        return orig_eval(model, data, cfg, device)
    E.evaluate = ev
    data = E.prepare_data(config)
    t0 = time.time()
    last = E.fit(config, data, E.WorkerContext(0, 1, torch.device("cpu")), report=lambda m, s, x: None)
    wall = time.time() - t0
    model = captured["model"]
    out = E.embed(model, data.train.images, torch.device("cpu"))
    with torch.no_grad():
        model.eval()
        z = torch.cat([model.projection(out["features"][i:i + 2048]) for i in range(0, len(out["features"]), 2048)])
    labels = np.asarray(data.train.labels)
    tag = f"{a.name}_ir{int(a.ir)}_s{a.seed}"
    np.savez_compressed(f"{OUT}/{tag}.npz", h=out["features"].numpy(), hidden=out["hidden"].numpy(),
                        A=out["assignments"].numpy(), z=z.numpy(), labels=labels,
                        pi=model.pooling.proportions().numpy())
    torch.save(model.state_dict(), f"{OUT}/{tag}.pt")
    K = config.model.num_clusters
    head = out["assignments"].numpy().argmax(1)
    hn = torch.nn.functional.normalize(out["features"], dim=1).numpy()
    km = KMeans(K, n_init=3, random_state=a.seed).fit(hn).labels_
    order = data.class_order
    row = {"recipe": a.name, "args": vars(a), "ir": a.ir, "seed": a.seed, "epochs": a.epochs,
           "wall_s": round(wall, 1), "knn_acc": last.get("knn_acc"),
           "true_sizes": sorted(np.bincount(labels, minlength=K).tolist(), reverse=True)}
    for nm, cl in (("head", head), ("kmeans_h", km)):
        m = metrics.cluster_metrics(labels, cl, K, class_order=order)
        for key in ("caa", "nmi", "acc", "tail_acc"):
            row[f"{nm}/train/{key}"] = round(m[key], 4)
        row[f"{nm}/predicted_sizes"] = sorted(np.bincount(cl, minlength=K).tolist(), reverse=True)
    row["engine_last"] = {k: v for k, v in last.items() if k.startswith("train/") or k.startswith("loss/")}
    print(json.dumps(row))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
