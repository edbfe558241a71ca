# Model stages: base model -> 4-bit QLoRA training -> adapter merge -> evaluation.


rule base_model:
    """Prepare a base model once: safetensors weights, fixed tokenizer, identity record."""
    input:
        unpack(base_model_inputs),
        code=code("base_model"),
    output:
        model=directory(L.base("{model}")),
    log:
        L.log("base_model", "{model}"),
    benchmark:
        L.benchmark("base_model", "{model}")
    conda:
        "../envs/model.yaml"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        model=lambda w: MODELS[w.model].config,
    script:
        "../scripts/base_model.py"


rule train:
    """4-bit QLoRA (or LoRA) with TRL's SFTTrainer; resumes from its own checkpoints."""
    input:
        unpack(sft_inputs),
        tokenized=lambda w: tokenized_dir(w.experiment),
        base=lambda w: L.base(model_of(w.experiment)),
        data_stats=lambda w: L.dataset_stats(dataset_of(w.experiment)),
        code=code("train"),
    output:
        adapter=directory(L.adapter("{experiment}")),
        steps=L.experiment("{experiment}", "train_log.jsonl"),
        loss_png=L.experiment("{experiment}", "loss.png"),
        summary=L.experiment("{experiment}", "train_summary.json"),
    log:
        L.log("train", "{experiment}"),
    benchmark:
        L.benchmark("train", "{experiment}")
    conda:
        "../envs/model.yaml"
    threads: workflow.cores
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=lambda w: gpus(w.experiment),
    params:
        spec=lambda w: EXPERIMENTS[w.experiment].adapter_spec(),
        # Outside every declared output: Snakemake deletes a failed job's outputs, not these.
        checkpoints=lambda w: L.outside("checkpoints", w.experiment),
    script:
        "../scripts/train.py"


rule merge:
    """Adapter merged into the 16-bit base; logits checked against base + adapter."""
    input:
        adapter=rules.train.output.adapter,
        dataset=lambda w: L.dataset(task_dataset_of(w.experiment)),
        code=code("merge"),
    output:
        merged=directory(L.merged("{experiment}")),
        report=L.experiment("{experiment}", "merge_report.json"),
    log:
        L.log("merge", "{experiment}"),
    benchmark:
        L.benchmark("merge", "{experiment}")
    conda:
        "../envs/model.yaml"
    threads: workflow.cores
    resources:
        mem_mb=16000,
        runtime=60,
        gpu=lambda w: gpus(w.experiment, single=True),
    params:
        settings=lambda w: EXPERIMENTS[w.experiment].merge.to_dict(),
    script:
        "../scripts/merge.py"


rule evaluate:
    """Base, merged and adapter-on-4-bit models side by side on the test split."""
    input:
        unpack(gguf_inputs),
        unpack(preference_eval_inputs),
        dataset=lambda w: L.dataset(task_dataset_of(w.experiment)),
        tokenized=lambda w: task_tokenized_dir(w.experiment),
        base=lambda w: L.base(model_of(w.experiment)),
        merged=rules.merge.output.merged,
        adapter=rules.train.output.adapter,
        regression=regression_dirs,
        lm_eval_tasks=lm_eval_task_files,
        code=code("evaluate"),
    output:
        metrics=L.metrics("{experiment}"),
        samples=L.experiment("{experiment}", "samples.jsonl"),
    log:
        L.log("evaluate", "{experiment}"),
    benchmark:
        L.benchmark("evaluate", "{experiment}")
    conda:
        "../envs/model.yaml"
    threads: workflow.cores
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=lambda w: gpus(w.experiment, single=True),
    params:
        settings=lambda w: EXPERIMENTS[w.experiment].evaluate.to_dict(),
        regression=lambda w: EXPERIMENTS[w.experiment].evaluate.regression,
        # a dpo run: its SFT experiment's, whose base scores it reuses where they are the same
        sft_settings=lambda w: EXPERIMENTS[task_of(w.experiment)].evaluate.to_dict(),
    script:
        "../scripts/evaluate.py"
