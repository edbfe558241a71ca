# Model stages: base model -> 4-bit QLoRA training -> adapter merge -> evaluation.


rule base_model:
    """Prepare a base model once: safetensors weights, fixed tokenizer, identity record."""
    input:
        unpack(base_model_inputs),
        code=code("base_model"),
    output:
        model=directory(f"{R}/base/{{model}}"),
    log:
        f"{R}/logs/base_model/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/base_model/{{model}}.tsv"
    conda:
        "../envs/model.yaml"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        model=lambda w: config["models"][w.model],
    script:
        "../scripts/base_model.py"


rule train:
    """4-bit QLoRA (or LoRA) with TRL's SFTTrainer; resumes from its own checkpoints."""
    input:
        tokenized=lambda w: tokenized_dir(w.experiment),
        base=lambda w: f"{R}/base/{config['experiments'][w.experiment]['model']}",
        data_stats=lambda w: f"{R}/data/{config['experiments'][w.experiment]['dataset']}/dataset_stats.json",
        code=code("train"),
    output:
        adapter=directory(f"{R}/{{experiment}}/adapter"),
        steps=f"{R}/{{experiment}}/train_log.jsonl",
        loss_png=f"{R}/{{experiment}}/loss.png",
        summary=f"{R}/{{experiment}}/train_summary.json",
    log:
        f"{R}/logs/train/{{experiment}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{experiment}}.tsv"
    conda:
        "../envs/model.yaml"
    threads: workflow.cores
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=lambda w: gpus(w.experiment),
    params:
        spec=lambda w: adapter_spec(w.experiment),
        # Outside every declared output: Snakemake deletes a failed job's outputs, not these.
        checkpoints=lambda w: f"{R}/checkpoints/{w.experiment}",
    script:
        "../scripts/train.py"


rule merge:
    """Adapter merged into the 16-bit base; logits checked against base + adapter."""
    input:
        adapter=f"{R}/{{experiment}}/adapter",
        dataset=lambda w: f"{R}/data/{config['experiments'][w.experiment]['dataset']}/dataset",
        code=code("merge"),
    output:
        merged=directory(f"{R}/{{experiment}}/merged"),
        report=f"{R}/{{experiment}}/merge_report.json",
    log:
        f"{R}/logs/merge/{{experiment}}.log",
    benchmark:
        f"{R}/benchmarks/merge/{{experiment}}.tsv"
    conda:
        "../envs/model.yaml"
    threads: workflow.cores
    resources:
        mem_mb=16000,
        runtime=60,
        gpu=lambda w: gpus(w.experiment, single=True),
    params:
        settings=lambda w: config["experiments"][w.experiment]["merge"],
    script:
        "../scripts/merge.py"


rule evaluate:
    """Base, merged and adapter-on-4-bit models side by side on the test split."""
    input:
        unpack(gguf_inputs),
        dataset=lambda w: f"{R}/data/{config['experiments'][w.experiment]['dataset']}/dataset",
        tokenized=lambda w: tokenized_dir(w.experiment),
        base=lambda w: f"{R}/base/{config['experiments'][w.experiment]['model']}",
        merged=f"{R}/{{experiment}}/merged",
        adapter=f"{R}/{{experiment}}/adapter",
        regression=regression_dirs,
        lm_eval_tasks=lm_eval_task_files,
        code=code("evaluate"),
    output:
        metrics=f"{R}/{{experiment}}/metrics.json",
        samples=f"{R}/{{experiment}}/samples.jsonl",
    log:
        f"{R}/logs/evaluate/{{experiment}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{experiment}}.tsv"
    conda:
        "../envs/model.yaml"
    threads: workflow.cores
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=lambda w: gpus(w.experiment, single=True),
    params:
        settings=lambda w: config["experiments"][w.experiment]["evaluate"],
        regression=lambda w: config["experiments"][w.experiment]["evaluate"][
            "regression"
        ],
    script:
        "../scripts/evaluate.py"
