"""Screen one variant of the full method (ours) on the quality study's budget (15 epochs, 4,000 images):

.venv/bin/python benchmarks/research/screen.py NAME IR SEED [cap=MAX_TAU_PLUS] [section.key=value ...]

Prints and appends to benchmarks/research/screen.jsonl: the head's CAA/ACC/tail acc, k-means on the features, kNN acc."""
import json, sys, time
import numpy as np, torch, yaml
from sklearn.cluster import KMeans
import jdcl_ray.engine as E
from jdcl_ray import bench, metrics
from jdcl_ray.losses import pooled_tau_plus

name, ir, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
over = {"loss": {"prior": "pooled"}, "eval": {"assign": "head"}}
cap = None
for arg in sys.argv[4:]:
    k, v = arg.split("=", 1)
    if k == "cap":
        cap = float(v); continue
    s, key = k.split(".")
    over.setdefault(s, {})[key] = yaml.safe_load(v)
if cap is not None:
    E.pooled_tau_plus = lambda a, p: pooled_tau_plus(a, p).clamp_max(cap)
study = bench.Study()
cfg = bench.run_config(study, ir, seed, over)
data = bench._subsample(E.prepare_data(cfg), study.max_images, seed)
t = time.time()
last, state = bench.train_once(cfg, data)
model = E.build_model(cfg, state["in_channels"]); model.load_state_dict(state["model"])
out = E.embed(model, data.train.images, torch.device("cpu"))
f = torch.nn.functional.normalize(out["features"], dim=1).numpy()
km = KMeans(10, n_init=3, random_state=seed).fit_predict(f)
kmm = metrics.cluster_metrics(data.train.labels, km, 10, class_order=data.class_order)
row = dict(name=name, ir=ir, seed=seed, wall=round(time.time()-t), head_caa=last["train/caa"], head_acc=last["train/acc"],
           tail=last["train/tail_acc"], km_caa=kmm["caa"], km_acc=kmm["acc"], knn=last["knn_acc"],
           sizes=sorted(last["predicted_sizes"], reverse=True), dcl=last["loss/dcl"])
print(json.dumps(row))
open("benchmarks/research/screen.jsonl", "a").write(json.dumps(row) + "\n")
