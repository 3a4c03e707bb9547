"""The dataset card (``README.md``) of a synthesis output, in the Hugging Face card format.

The YAML header tells ``datasets.load_dataset(<output>)`` where the shards are (``data/``) and that
``image`` holds images; the body says what made the dataset, what it holds, how to read it, and whose
licences bind it.
"""

from __future__ import annotations

from typing import Any

import yaml

from synray.config.synth import SynthConfig
from synray.io import shards

#: Hugging Face feature types of the shard columns, and what each column means
COLUMNS = [
    ("image", "image", "encoded PNG/JPEG bytes (a `datasets` Image)"),
    ("identity", "int64", "identity label"),
    ("sample", "int32", "image index within the identity (context faces from 1000000)"),
    ("kind", "string", "`generated`, `context` (the context face, ID augmentation), `augmented` or `real`"),
    ("seed", "int64", "the per-image seed derived from (run seed, identity, sample); -1 for context faces"),
    ("height", "int32", "image height"),
    ("width", "int32", "image width"),
    ("quality", "float32", "identity consistency (cosine to the identity's anchor), NaN if not computed"),
    ("identity_b", "int64", "SynFace identity mixup partner (soft label), -1 when unmixed"),
    ("mix_weight", "float32", "weight of `identity` in the soft label (1 when unmixed)"),
]

LICENCES = {
    "world": "The images come from synray's built-in parametric face world, a procedural renderer: no third-party"
             " model weights and no real face data went into them.",
    "ldm": "The images are outputs of the latent-diffusion checkpoints listed above. Their terms bind this dataset:"
           " the published IDiff-Face, ADMIS and UIFace weights were trained on real face datasets (CASIA-WebFace,"
           " FFHQ) whose licences restrict use (research, non-commercial); check the terms of the checkpoints used"
           " and of their training data before any use or redistribution.",
    "dcgan": "The images are outputs of the DCGAN of the gan-face-generate package (MIT code), trained on DigiFace-1M,"
             " which Microsoft releases under a research licence: check it before any use or redistribution.",
}


def _header(cfg: SynthConfig) -> str:
    meta: dict[str, Any] = {
        "pretty_name": cfg.name,
        "license": "other",
        "tags": ["synthetic", "faces", "face-recognition", "synray"],
        "task_categories": ["image-classification"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{shards.DATA_DIR}/part-*.parquet"}]}],
        "dataset_info": {"features": [{"name": n, "dtype": t} for n, t, _ in COLUMNS]},
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def dataset_card(cfg: SynthConfig, manifest: dict[str, Any], inputs: dict[str, str], samples: bool = False) -> str:
    """The card text; ``inputs`` maps dotted config keys of input files to their content digests."""
    g = cfg.generator
    q = manifest.get("quality")
    kinds = ", ".join(f"{k}: {v:,}" for k, v in sorted(manifest["kinds"].items())) or "none"
    made = [f"- generator: `{g.type}`, {g.images_per_identity} images per identity, seed {cfg.seed}"]
    if g.type == "ldm":
        s = g.sampler
        settings = ", ".join(f"{k} {v}" for k, v in s.model_dump(mode="json").items() if k != "method")
        made.append(f"- sampler: `{s.method}` ({settings})")
    a = cfg.alignment
    align = "none (the generator's output as it is)" if a.mode == "none" else f"`{a.mode}` to {a.size[0]}x{a.size[1]}"
    made.append(f"- contexts: `{cfg.contexts.source}` ({cfg.contexts.dim}-d); alignment: {align}; ID augmentation:"
                f" {cfg.augment.context_repeats} context face(s) per identity")
    made.append(f"- identities {cfg.identities.start} to {cfg.identities.start + cfg.identities.count - 1}, in work units"
                f" of {cfg.identities.unit_size} (one shard each)")
    made += [f"- `{k}`: content `{d}`" for k, d in sorted(inputs.items())]
    made.append(f"- config hash `{manifest.get('config_hash')}` (settings and input file contents); the resolved"
                f" config is `{shards.CONFIG}`, per-shard counts and statistics are `{shards.MANIFEST}`")
    quality = (f"{q['mean']:.4f} ± {q['std']:.4f} (min {q['min']:.4f}, max {q['max']:.4f}) over {q['n']:,} images"
               if q else "not computed")
    lines = [
        _header(cfg),
        f"# {cfg.name}",
        "",
        "Synthetic, identity-labelled face images made by synray (`synray synth`).",
        "",
        "## Contents",
        "",
        "| | |",
        "|---|---|",
        f"| images | {manifest['rows']:,} |",
        f"| identities | {manifest['identities']:,} |",
        f"| kinds | {kinds} |",
        f"| shards | {manifest['shards']:,} (`{shards.DATA_DIR}/part-NNNNNN.parquet`) |",
        f"| identity consistency | {quality} |",
        "",
    ]
    if samples:
        lines += [f"![one image per work unit]({shards.SAMPLES})", ""]
    lines += ["## How it was made", "", *made, "", "## Columns", "", "| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{n}` | {t} | {m} |" for n, t, m in COLUMNS]
    lines += [
        "",
        "## Reading it",
        "",
        "```python",
        "datasets.load_dataset(\"<this folder>\")              # Hugging Face: reads this card, `image` as images",
        "pyarrow.dataset.dataset(\"<this folder>/data\")       # also pyarrow.parquet.read_table, pandas.read_parquet",
        "duckdb.sql(\"SELECT * FROM '<this folder>/data/*.parquet'\")",
        "ray.data.read_parquet(\"<this folder>/data\")",
        "```",
        "",
        f"The dataset is complete when `{shards.SUCCESS}` exists (written after everything else).",
        "",
        "## Licence",
        "",
        LICENCES[g.type],
    ]
    if inputs.get("contexts.embedder") or inputs.get("quality.embedder"):
        lines += ["", "The face-recognition embedders listed above (contexts, consistency scores) carry their own"
                  " licences and those of their training data."]
    return "\n".join(lines) + "\n"
