"""Over-cluster (k-means, K' >> K) then merge sub-clusters to K without an equal-size bias."""
import json, sys
import numpy as np
from sklearn.cluster import KMeans, AgglomerativeClustering
import analyze as A

def overcluster_merge(x, K=10, Kp=50, link="average", graph=None, seed=0):
    x = A.unit(x)
    km = KMeans(Kp, n_init=3, random_state=seed).fit(x)
    sub = km.labels_
    if graph is None:
        c = A.unit(km.cluster_centers_)
        agg = AgglomerativeClustering(K, metric="cosine", linkage=link).fit(c)
    else:  # kNN-graph affinity between sub-clusters: edges / sqrt(size_i size_j)
        n = len(x); E = np.zeros((Kp, Kp))
        np.add.at(E, (np.repeat(sub, graph.shape[1]), sub[graph.ravel()]), 1)
        E = E + E.T; s = np.bincount(sub, minlength=Kp).astype(float)
        S = E / np.sqrt(np.outer(s, s)); np.fill_diagonal(S, 0); S = S / S.max()
        agg = AgglomerativeClustering(K, metric="precomputed", linkage=link).fit(1 - S)
    return agg.labels_[sub]

if __name__ == "__main__":
    d = np.load(sys.argv[1]); y = d["labels"]
    xs = {"h": d["h"]}
    if len(sys.argv) > 2 and sys.argv[2] == "pixels":
        from jdcl_ray.config import load_config; from jdcl_ray.engine import prepare_data
        ir = int(sys.argv[3]); cfg = load_config("/work/main/configs/fashion_lt.yaml", {"data": {"imbalance_ratio": ir}})
        data = prepare_data(cfg); xs = {"pix": data.train.images.flatten(1).float().numpy() / 255}; y = np.asarray(data.train.labels)
    res = {"file": sys.argv[1:]}
    for nm, x in xs.items():
        g = A.knn_graph(x, 20)
        for Kp in (30, 50):
            for link in ("average", "complete"):
                res[f"{nm}_K{Kp}_{link}"] = A.score(y, overcluster_merge(x, Kp=Kp, link=link))
                print(f"{nm}_K{Kp}_{link}", res[f"{nm}_K{Kp}_{link}"], flush=True)
            for link in ("average", "single"):
                key = f"{nm}_K{Kp}_graph_{link}"
                res[key] = A.score(y, overcluster_merge(x, Kp=Kp, link=link, graph=g)); print(key, res[key], flush=True)
    open("/work/main/benchmarks/research/offline.jsonl", "a").write(json.dumps(res) + "\n")
