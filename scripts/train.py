"""Rule train: tokenized data + base model -> LoRA adapter, step log, loss curve, summary."""

import json

from kiln.smk import setup_log, use_cores
from kiln.train import train

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm, console=True)  # keep the progress bar (with ETA) on the console
splits = json.loads(open(sm.input.data_stats).read())["splits"]
train(
    sm.input.tokenized,
    sm.input.base,
    sm.output.adapter,
    sm.output.steps,
    sm.output.loss_png,
    sm.output.summary,
    sm.params.checkpoints,
    sm.params.training,
    sm.params.tokenize,
    data_fingerprints={name: s["fingerprint"] for name, s in splits.items()},
    experiment=sm.wildcards.experiment,
    threads=use_cores(sm),
    tracking=sm.config["tracking"],  # where metrics go live: not a parameter of the model
)
