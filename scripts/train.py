"""Rule train: tokenized data + base model -> LoRA adapter, step log, loss curve, summary.

training.num_gpus >= 2 (the job's `gpu` resource, which a profile's set-resources can raise): the
same function in that many DDP processes through `accelerate launch`.
"""

import json

from kiln.families import refuse_unknown_export
from kiln.launch import launch
from kiln.pref_train import adapter_fingerprint, train_preference
from kiln.smk import setup_log, use_cores
from kiln.spec import TokenizeSettings, TrainingSettings
from kiln.train import TrainingPaths, train

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_log(sm, console=True)  # keep the progress bar (with ETA) on the console
# What export needs of the chat template, checked before a step is spent (read from the config, not
# a parameter: export settings are no reason to retrain).
experiment = sm.config["experiments"][sm.wildcards.experiment]
refuse_unknown_export(sm.input.base, experiment.get("export", {}), f"experiments.{sm.wildcards.experiment}")
splits = json.loads(open(sm.input.data_stats).read())["splits"]
paths = TrainingPaths(
    tokenized_dir=sm.input.tokenized,
    base_dir=sm.input.base,
    adapter_dir=sm.output.adapter,
    step_log_out=sm.output.steps,
    loss_png=sm.output.loss_png,
    summary_path=sm.output.summary,
    ckpt_dir=sm.params.checkpoints,
    start_adapter=sm.input.get("sft_adapter", ""),  # method dpo: the SFT experiment's adapter
)
fingerprints = {name: s["fingerprint"] for name, s in splits.items()}
if paths.start_adapter:  # a retrained SFT adapter is another starting point: the run key says so
    fingerprints["sft_adapter"] = adapter_fingerprint(paths.start_adapter)
spec = dict(
    paths=paths,
    settings=TrainingSettings.coerce(sm.params.spec["training"]),
    tokenize=TokenizeSettings.coerce(sm.params.spec["tokenize"]),
    spec=sm.params.spec,
    data_fingerprints=fingerprints,
    experiment=sm.wildcards.experiment,
    threads=use_cores(sm),
    tracking=sm.config["tracking"],  # where metrics go live: not a parameter of the model
)
# The job's resource: training.num_gpus unless the profile set another (set-resources: train:gpu=N).
processes = int(sm.resources.get("gpu", sm.params.spec["training"]["num_gpus"]))
if processes > 1:
    spec["threads"] = max(1, spec["threads"] // processes)
    launch(spec, processes, log_file=sm.log[0])
elif spec["settings"].method != "sft":  # dpo: TRL's DPOTrainer from the SFT adapter (kiln.pref_train)
    train_preference(**spec)
else:
    train(**spec)
