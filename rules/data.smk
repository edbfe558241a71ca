# Data stages: collect (one job per source file) -> clean (one job per shard) -> build -> tokenize.


rule collect:
    """Read one shard of one source into the canonical raw table, with lineage per row."""
    input:
        data=collect_input,
        code=code("collect"),
    output:
        raw=f"{R}/data/{{dataset}}/raw/{{source}}/{{shard}}.parquet",
    log:
        f"{R}/logs/collect/{{dataset}}/{{source}}/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/collect/{{dataset}}/{{source}}/{{shard}}.tsv"
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        source=lambda w: source_config(config, w.dataset, w.source),
    script:
        "../scripts/collect.py"


rule clean:
    """Normalise, filter and deduplicate one raw shard; every dropped row gets a reason."""
    input:
        raw=f"{R}/data/{{dataset}}/raw/{{source}}/{{shard}}.parquet",
        code=code("clean"),
    output:
        clean=f"{R}/data/{{dataset}}/clean/{{source}}/{{shard}}.parquet",
        rejected=f"{R}/data/{{dataset}}/rejected/{{source}}/{{shard}}.parquet",
        stats=f"{R}/data/{{dataset}}/stats/{{source}}/{{shard}}.json",
    log:
        f"{R}/logs/clean/{{dataset}}/{{source}}/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/clean/{{dataset}}/{{source}}/{{shard}}.tsv"
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        settings=lambda w: config["datasets"][w.dataset]["clean"],
    script:
        "../scripts/clean.py"


rule build_dataset:
    """All clean shards -> cross-shard dedup -> hash split -> a DatasetDict on disk."""
    input:
        shards=clean_shards,
        code=code("build_dataset"),
    output:
        dataset=directory(f"{R}/data/{{dataset}}/dataset"),
        rejected=f"{R}/data/{{dataset}}/build_rejected.parquet",
        stats=f"{R}/data/{{dataset}}/dataset_stats.json",
    log:
        f"{R}/logs/build_dataset/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/build_dataset/{{dataset}}.tsv"
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=lambda w: config["datasets"][w.dataset]["build"],
        mixture=mixture,
        data_dir=lambda w: f"{R}/data/{w.dataset}",
    script:
        "../scripts/build_dataset.py"


rule tokenize:
    """The dataset through the base model's tokenizer and chat template, loss masks included."""
    input:
        dataset=f"{R}/data/{{dataset}}/dataset",
        base=f"{R}/base/{{model}}",
        code=code("tokenize_dataset"),
    output:
        tokenized=directory(f"{R}/data/{{dataset}}/tokenized/{{model}}-{{tok}}"),
        stats=f"{R}/data/{{dataset}}/tokenized/{{model}}-{{tok}}.json",
    log:
        f"{R}/logs/tokenize/{{dataset}}/{{model}}-{{tok}}.log",
    benchmark:
        f"{R}/benchmarks/tokenize/{{dataset}}/{{model}}-{{tok}}.tsv"
    conda:
        "../envs/model.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=lambda w: tokenization_settings(
            config, w.dataset, f"{w.model}-{w.tok}"
        ),
        # Tokens of rows seen before, by content hash; outside the outputs, which a rerun deletes.
        cache=lambda w: f"{R}/cache/tokenize/{w.dataset}/{w.model}-{w.tok}",
    script:
        "../scripts/tokenize_dataset.py"
