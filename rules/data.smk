# Data stages: collect (one job per source file) -> clean (one job per shard) -> build -> tokenize.
# Paths come from kiln.layout (L); a rule's input that is another rule's output names it.


rule collect:
    """Read one shard of one source into the canonical raw table, with lineage per row."""
    input:
        data=collect_input,
        code=code("collect"),
    output:
        raw=L.shard("{dataset}", "raw", "{source}", "{shard}"),
    log:
        L.log("collect", "{dataset}/{source}/{shard}"),
    benchmark:
        L.benchmark("collect", "{dataset}/{source}/{shard}")
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        source=lambda w: DATASETS[w.dataset].source(w.source).config,
        # the only record kinds its experiments train on: [] any, [preference] for dpo
        kinds=lambda w: expected_kinds(config, w.dataset),
    script:
        "../scripts/collect.py"


rule clean:
    """Normalise, filter and deduplicate one raw shard; every dropped row gets a reason."""
    input:
        raw=rules.collect.output.raw,
        code=code("clean"),
    output:
        clean=L.shard("{dataset}", "clean", "{source}", "{shard}"),
        rejected=L.shard("{dataset}", "rejected", "{source}", "{shard}"),
        stats=L.shard("{dataset}", "stats", "{source}", "{shard}", "json"),
    log:
        L.log("clean", "{dataset}/{source}/{shard}"),
    benchmark:
        L.benchmark("clean", "{dataset}/{source}/{shard}")
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        settings=lambda w: DATASETS[w.dataset].clean.to_dict(),
    script:
        "../scripts/clean.py"


rule build_dataset:
    """All clean shards -> cross-shard dedup -> hash split -> a DatasetDict on disk."""
    input:
        shards=clean_shards,
        code=code("build_dataset"),
    output:
        dataset=directory(L.dataset("{dataset}")),
        rejected=L.build_rejected("{dataset}"),
        stats=L.dataset_stats("{dataset}"),
    log:
        L.log("build_dataset", "{dataset}"),
    benchmark:
        L.benchmark("build_dataset", "{dataset}")
    conda:
        "../envs/data.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        settings=lambda w: DATASETS[w.dataset].build.to_dict(),
        mixture=mixture,
        data_dir=lambda w: L.data(w.dataset),
    script:
        "../scripts/build_dataset.py"


rule tokenize:
    """The dataset through the base model's tokenizer and chat template, loss masks included."""
    input:
        dataset=rules.build_dataset.output.dataset,
        base=L.base("{model}"),
        code=code("tokenize_dataset"),
    output:
        tokenized=directory(L.tokenized("{dataset}", "{model}-{tok}")),
        stats=L.tokenize_stats("{dataset}", "{model}-{tok}"),
    log:
        L.log("tokenize", "{dataset}/{model}-{tok}"),
    benchmark:
        L.benchmark("tokenize", "{dataset}/{model}-{tok}")
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
        cache=lambda w: L.outside("cache", f"tokenize/{w.dataset}/{w.model}-{w.tok}"),
    script:
        "../scripts/tokenize_dataset.py"
