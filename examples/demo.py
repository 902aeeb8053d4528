"""The posvit demo: the whole pipeline on the shipped example data and the shipped encoder, in one folder.

    make demo                                   # or: python examples/demo.py [--out demo-output] [--quick]

Steps (each printed as the `posvit` command it runs, so you can rerun any of them by hand):

1. extract   posvit-tiny features of homogeneous textures (probe set) and of particle micrographs (tiled)
2. probe     positional bias of the raw features: stack R² of linear probes of position ramps
3. rasa      a RASA head trained on the cached texture features, applied to both stores without re-extraction
3b. auto     every cheap head (svd, posmean, blank, rasa) fitted on part of each store and scored on the rest: the
             least positional one within 0.05 of what the raw features keep (kNN agreement, or mIoU with masks)
4. alibi     a short CPU ALiBi retrofit of posvit-tiny distilled on generated micrographs, then re-extraction
5. probe     bias after each method
6. cluster   overclustering mIoU against the micrographs' ground truth, per feature set
7. segment   scribble segmentation on two images, scored on held-out ones: classical features alone, + raw
             ViT features, + debiased ViT features
8. report    one table across raw, RASA and ALiBi features of the micrographs: positional R², linear-probe
             semantic mIoU and overclustering (report.md, report.json)
9. viz       figures and an index.html

It ends with a summary table (also `summary.json`) and names the folder holding every output.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
DATA = EXAMPLES / "data"
MARKER = ".posvit-demo"
MODEL = "posvit-tiny"
TRAIN_IMAGES = ("particles_256_01", "particles_256_02")
HELD_OUT = ("particles_256_03", "particles_512_01", "particles_1024_01")


class Demo:
    def __init__(self, out: Path, quick: bool):
        self.out = out
        self.quick = quick
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.auto_chosen: dict[str, str] = {}
        self.env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def step(self, title: str) -> None:
        self.say(f"\n== {title} " + "=" * max(0, 100 - len(title)))

    def posvit(self, *args: str | Path, json_out: bool = False) -> dict | None:
        """Run one posvit command, echoing it; returns its --json document when asked."""
        argv = [_short(str(a)) for a in args]  # run exactly what is shown
        shown = " ".join(shlex.quote(a) for a in argv)
        self.say(f"$ posvit {shown}")
        cmd = [sys.executable, "-m", "posvit_cli", *argv] + (["--json"] if json_out else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE if json_out else None, env=self.env)
        self.timings[argv[0]] = self.timings.get(argv[0], 0.0) + time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"demo: `posvit {shown}` failed with exit code {proc.returncode}")
        return json.loads(proc.stdout) if json_out else None

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        o = self.out
        particles = sorted((DATA / "micrographs").glob("particles_*.png"))
        if self.quick:
            particles = [p for p in particles if "1024" not in p.name]
        listing = o / "particles.txt"
        listing.write_text("".join(f"{p}\n" for p in particles))
        held_out = [p for p in particles if p.stem in HELD_OUT]
        train = [p for p in particles if p.stem in TRAIN_IMAGES]
        tile = ["--tile", "256", "--overlap", "32"]

        self.step("1. extract: posvit-tiny features (shipped encoder, offline)")
        self.posvit("extract", DATA / "textures", "-m", MODEL, "-o", o / "textures_raw.h5", "-q")
        self.posvit("extract", listing, "-m", MODEL, *tile, "-o", o / "particles_raw.h5", "-q")

        self.step("2. probe: how much position the raw features carry")
        probes = {"raw": self.posvit("probe", o / "textures_raw.h5", "-o", o / "probe_raw.json", json_out=True)}

        self.step("3. debias-train rasa: a projection head on cached features, applied to stores")
        # Franca's defaults assume ~10k images; with 12 images, one image per step gives the planes enough steps.
        epochs = "10" if self.quick else "20"
        self.posvit("debias-train", "rasa", o / "textures_raw.h5", "-o", o / "rasa.safetensors",
                    "--batch-images", "1", "--epochs", epochs, "--lr-head", "2e-3", "-q")
        for name in ("textures", "particles"):
            self.posvit("extract", o / f"{name}_raw.h5", "--head", o / "rasa.safetensors",
                        "-o", o / f"{name}_rasa.h5", "-q")

        self.step("3b. debias-train auto: every cheap head fitted on part of each store, scored on the rest")
        autos = {
            "textures": self.posvit("debias-train", "auto", o / "textures_raw.h5", "-o", o / "auto_textures.safetensors",
                                    "--table", o / "auto_textures.json", json_out=True),
            "particles": self.posvit("debias-train", "auto", o / "particles_raw.h5", "--masks", DATA / "masks",
                                     "-o", o / "auto_particles.safetensors", "--table", o / "auto_particles.json",
                                     json_out=True),
        }
        self.auto_chosen = {name: doc["chosen"] for name, doc in autos.items()}

        self.step("4. debias-train alibi: retrofit posvit-tiny with 2-D ALiBi and distil it (short CPU run)")
        train_dir = o / "alibi-train-images"
        n_per_kind = 12 if self.quick else 32
        _generate_training_images(train_dir, n_per_kind)
        stages = "128:2" if self.quick else "128:3"
        self.posvit("debias-train", "alibi", train_dir, "-m", MODEL, "-o", o / "alibi.safetensors",
                    "--stages", stages, "--batch-size", "16", "--micro-batch", "16",
                    "--monitor-images", DATA / "textures", "--eval-every", "0", "-q")
        self.posvit("extract", DATA / "textures", "--weights", o / "alibi.safetensors",
                    "-o", o / "textures_alibi.h5", "-q")
        self.posvit("extract", listing, "--weights", o / "alibi.safetensors", *tile,
                    "-o", o / "particles_alibi.h5", "-q")

        self.step("5. probe: bias after debiasing")
        for method in ("rasa", "alibi"):
            probes[method] = self.posvit("probe", o / f"textures_{method}.h5", "-o", o / f"probe_{method}.json",
                                         json_out=True)

        self.step("6. cluster: overclustering mIoU against the ground truth (binder / particle / pore)")
        ks = "3,12"
        clusters = {}
        for method in ("raw", "rasa", "alibi"):
            clusters[method] = self.posvit(
                "cluster", o / f"particles_{method}.h5", "-k", ks, "--masks", DATA / "masks",
                "--seeds", "0-2" if not self.quick else "0", "--num-classes", "3",
                "-o", o / f"clusters_{method}.h5", "--threads", "1", "-q", json_out=True,
            )

        self.step("7. segment: scribbles on two images, scored on held-out images")
        segments = {}
        for variant, store in (("classical", None), ("raw", "raw"), ("rasa", "rasa"), ("alibi", "alibi")):
            feats = ["--features", o / f"particles_{store}.h5"] if store else []
            model = o / f"seg_{variant}.posvit-seg"
            self.posvit("segment", "train", *train, "--labels", DATA / "scribbles", *feats, "-o", model, "-q")
            pred = o / f"segmentation_{variant}"
            self.posvit("segment", "apply", model, *held_out, *feats, "-o", pred, "-q")
            segments[variant] = self.posvit("segment", "eval", pred, "--masks", DATA / "masks",
                                            "-q", json_out=True)

        self.step("8. report: positional R², semantic mIoU and overclustering of the micrograph features, one table")
        report = self.posvit(
            "report", *(o / f"particles_{m}.h5" for m in ("raw", "rasa", "alibi")), "--names", "raw,RASA,ALiBi",
            "--masks", DATA / "masks", "--num-classes", "3", "--class-names", "binder,particle,pore",
            "-k", "3,12", "--seeds", "0", "--cluster-threads", "1",
            "-o", o / "report.md", "-o", o / "report.json", "-q", json_out=True,
        )

        self.step("9. viz: figures and index.html")
        viz = o / "viz"
        self.posvit("viz", "report", o / "report.json", "-o", viz, "-q")
        self.posvit("viz", "compare", *(o / f"textures_{m}.h5" for m in ("raw", "rasa", "alibi")),
                    "--name", "raw", "--name", "RASA", "--name", "ALiBi",
                    *sum((["--probe", str(o / f"probe_{m}.json")] for m in ("raw", "rasa", "alibi")), []),
                    "-n", "2", "--standardise", "-o", viz, "-q")
        self.posvit("viz", "probe", *(o / f"probe_{m}.json" for m in ("raw", "rasa", "alibi")),
                    "--name", "raw", "--name", "RASA", "--name", "ALiBi", "-o", viz, "-q")
        for method in ("raw", "alibi"):
            self.posvit("viz", "clusters", o / f"clusters_{method}.h5", "-o", viz, "-q")
        held_list = o / "held_out.txt"
        held_list.write_text("".join(f"{p}\n" for p in held_out))
        for variant in ("raw", "alibi"):
            self.posvit("viz", "segmentation", held_list, o / f"segmentation_{variant}", "-o", viz, "-q")

        return self.summarise(probes, clusters, segments, report)

    # ------------------------------------------------------------------------------------------------------
    def summarise(self, probes: dict, clusters: dict, segments: dict, report: dict) -> dict:
        def stack(result, target):
            return result["results"][result["primary_layer"]]["stack_r2"][target]["mean"]

        def cluster_row(result, k):
            row = next(r for r in result["results"] if r["k"] == k)
            return row["miou_mean"], row["position_dependence"]["dependence"]

        semantic = {r["name"]: (r["semantic"] or {}).get("miou") for r in report["rows"]}
        rows = []
        for method, label in (("raw", "raw posvit-tiny"), ("rasa", "+ RASA head"), ("alibi", "ALiBi retrofit")):
            k3, dep3 = cluster_row(clusters[method], 3)
            k12, _ = cluster_row(clusters[method], 12)
            seg = segments[method]["summary"]
            rows.append({
                "features": label,
                "xy_stack_r2": stack(probes[method], "xy"),
                "random_control_r2": stack(probes[method], "random"),
                "overcluster_miou_k3": k3,
                "overcluster_miou_k12": k12,
                "cluster_position_dependence_k3": dep3,
                "semantic_miou": semantic[{"raw": "raw", "rasa": "RASA", "alibi": "ALiBi"}[method]],
                "segment_miou": seg["dataset_miou"],
                "segment_positional_r2": seg["positional_r2_mean"],
            })
        seg = segments["classical"]["summary"]
        rows.append({"features": "classical only", "segment_miou": seg["dataset_miou"],
                     "segment_positional_r2": seg["positional_r2_mean"]})
        summary = {
            "quick": self.quick,
            "rows": rows,
            "auto_chosen": self.auto_chosen,
            "seconds": round(time.perf_counter() - self.t0, 1),
            "seconds_per_command": {k: round(v, 1) for k, v in self.timings.items()},
            "output": str(self.out),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _short(arg: str) -> str:
    """A path relative to the working directory when that is shorter and does not climb out of it."""
    if os.path.isabs(arg):
        rel = os.path.relpath(arg)
        if not rel.startswith(".."):
            return rel
    return arg


def _generate_training_images(folder: Path, n_per_kind: int) -> None:
    """Fresh synthetic micrographs for the ALiBi distillation (seeds disjoint from the shipped examples)."""
    import numpy as np
    from PIL import Image

    from posvit_cli.core.synthetic.generate import make_sample
    from posvit_cli.core.synthetic.structures import KINDS

    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for kind in KINDS:
        for j in range(n_per_kind):
            sample = make_sample(kind, 128, 500_000 + i, with_scribbles=False)
            i += 1
            img = sample.image
            if img.dtype != np.uint8:
                img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{kind}_{j:03d}.png")


def print_summary(summary: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def f(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    t = Table(title="posvit demo: positional bias and what removing it does", title_justify="left",
              box=box.SIMPLE_HEAD)
    for col in ("features", "xy R²", "rand R²", "clu k=3", "clu k=12", "pos dep", "sem mIoU", "seg mIoU", "seg R²"):
        t.add_column(col, justify="left" if col == "features" else "right", no_wrap=True)
    for r in summary["rows"]:
        t.add_row(r["features"], f(r.get("xy_stack_r2")), f(r.get("random_control_r2")),
                  f(r.get("overcluster_miou_k3")), f(r.get("overcluster_miou_k12")),
                  f(r.get("cluster_position_dependence_k3")), f(r.get("semantic_miou")), f(r.get("segment_miou")),
                  f(r.get("segment_positional_r2")))
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and pipes: wide enough for the table instead of Rich's 80 columns
        console = Console(stderr=True, width=110)
    console.print()
    console.print(t)
    console.print(
        "xy R²: held-out R² of a ridge probe of (x, y) from all channels of one texture image (1 = position fully "
        "decodable); rand R²: the same probe of a random target (its null). clu k: overclustering mIoU of the "
        "particle micrographs against their ground truth; pos dep: position dependence of the k=3 clusters (mutual "
        "information of cluster and image quadrant above its value for randomly rolled label maps: 1 = clusters "
        "as aligned to the grid as their sizes allow, 0 = no more than by chance). sem mIoU: a linear probe (batch norm + linear layer) trained on the "
        "features of the micrographs' masks and scored on a held-out micrograph (posvit report). seg mIoU: scribble segmentation scored on held-out images; seg R²: "
        "positional R² of its predictions (near 0 = no position in the output)."
    )
    for store, chosen in summary.get("auto_chosen", {}).items():
        console.print(f"debias-train auto chose [bold]{chosen}[/] for the {store} store "
                      f"(table: {summary['output']}/auto_{store}.json)")
    console.print(f"\nFinished in {summary['seconds']:.0f} s. Every output is in [bold]{summary['output']}[/] "
                  f"(figures: {summary['output']}/viz/index.html, numbers: {summary['output']}/summary.json).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the posvit pipeline on the shipped example data.")
    ap.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    ap.add_argument("--quick", action="store_true", help="a reduced run for the test suite (~2 min)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        if not (out / MARKER).exists():
            print(f"demo: '{out}' exists and is not a posvit demo folder; choose another --out", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by examples/demo.py; safe to delete\n")
    summary = Demo(out, args.quick).run()
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
