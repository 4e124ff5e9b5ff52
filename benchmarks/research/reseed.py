"""Screen: re-seed near-empty DDC clusters from the samples the statistics pooling block explains
worst (highest OOD score), once per epoch after the clustering warm-up.

.venv/bin/python benchmarks/research/reseed.py NAME IR SEED [threshold] [section.key=value ...]

A cluster k holding < threshold / K of the batch (argmax) is re-seeded: its logit row becomes a copy
of the row of the cluster j holding the worst-explained sample x, plus a step towards x's hidden
vector (and j's row a step away), so the samples near x move from j to k.
"""
import json
import sys
import time

import torch
import yaml
from sklearn.cluster import KMeans

import jdcl_ray.engine as E
from jdcl_ray import bench, metrics

name, ir, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
threshold = float(sys.argv[4]) if len(sys.argv) > 4 and "=" not in sys.argv[4] else 0.2
over = {"loss": {"prior": "pooled", "temperature": 0.5}, "eval": {"assign": "head"}}
for arg in sys.argv[4:]:
    if "=" in arg:
        k, v = arg.split("=", 1)
        s, key = k.split(".")
        over.setdefault(s, {})[key] = yaml.safe_load(v)

original = E.joint_loss
seen_epochs = set()
reseeds = []


def joint_loss(model, pooling_source, views, config, epoch):
    if epoch >= config.loss.clustering_warmup_epochs and epoch not in seen_epochs:
        seen_epochs.add(epoch)
        with torch.no_grad():
            k_all = config.model.num_clusters
            out = pooling_source(views)
            # hard shares: the soft pooled n_k never gets near 0 while argmax counts do
            hard = torch.bincount(out.assignments.argmax(1), minlength=k_all) / len(views)
            dead = torch.nonzero(hard < threshold / k_all).flatten().tolist()
            if dead:
                score = pooling_source.pooling.ood_score(out.features)
                order = torch.argsort(score, descending=True)
                logits = pooling_source.clustering.logits
                for rank, k in enumerate(dead):
                    x = order[rank]
                    j = int(out.assignments[x].argmax())
                    direction = out.cluster_hidden[x] / out.cluster_hidden[x].norm().clamp_min(1e-6)
                    logits.weight[k] = logits.weight[j] + direction
                    logits.bias[k] = logits.bias[j]
                    logits.weight[j] -= direction
                    reseeds.append((epoch, k, j))
    return original(model, pooling_source, views, config, epoch)


E.joint_loss = joint_loss
study = bench.Study()
cfg = bench.run_config(study, ir, seed, over)
data = bench._subsample(E.prepare_data(cfg), study.max_images, seed)
t = time.time()
last, state = bench.train_once(cfg, data)
model = E.build_model(cfg, state["in_channels"])
model.load_state_dict(state["model"])
out = E.embed(model, data.train.images, torch.device("cpu"))
f = torch.nn.functional.normalize(out["features"], dim=1).numpy()
km = KMeans(10, n_init=3, random_state=seed).fit_predict(f)
kmm = metrics.cluster_metrics(data.train.labels, km, 10, class_order=data.class_order)
row = dict(name=name, ir=ir, seed=seed, threshold=threshold, wall=round(time.time() - t),
           head_caa=last["train/caa"], head_acc=last["train/acc"], tail=last["train/tail_acc"],
           km_caa=kmm["caa"], knn=last["knn_acc"], reseeds=len(reseeds),
           sizes=sorted(last["predicted_sizes"], reverse=True))
print(json.dumps(row))
with open("benchmarks/research/screen.jsonl", "a") as fh:
    fh.write(json.dumps(row) + "\n")
