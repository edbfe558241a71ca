# Light aggregation: run where Snakemake runs, never submitted to a cluster.
localrules:
    all,
    compare,
    publish,
    data_report,


# Audit: one manifest per experiment, the published model with its card, the comparison of all
# experiments, and the data-stage statistics; outputs marked report() make `snakemake --report`.


rule manifest:
    """Everything that made one experiment and how it scored, in one JSON (plus HTML views)."""
    input:
        dataset_stats=lambda w: f"{R}/data/{dataset_of(w.experiment)}/dataset_stats.json",
        tokenize_stats=lambda w: tokenize_stats_of(w.experiment),
        base=lambda w: f"{R}/base/{config['experiments'][w.experiment]['model']}",
        adapter=f"{R}/{{experiment}}/adapter",
        merged=f"{R}/{{experiment}}/merged",
        metrics=f"{R}/{{experiment}}/metrics.json",
        samples=f"{R}/{{experiment}}/samples.jsonl",
        summary=f"{R}/{{experiment}}/train_summary.json",
        merge_report=f"{R}/{{experiment}}/merge_report.json",
        shard_stats=lambda w: shard_stats_of_dataset(dataset_of(w.experiment)),
        gguf_reports=lambda w: gguf_inputs(w)["gguf_reports"],
        code=code("manifest"),
    output:
        manifest=f"{R}/{{experiment}}/manifest.json",
        html=report(
            f"{R}/{{experiment}}/manifest.html",
            caption="../report/manifest.rst",
            category="Experiments",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "view": "manifest"},
        ),
        samples_html=report(
            f"{R}/{{experiment}}/samples.html",
            caption="../report/samples.rst",
            category="Experiments",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "view": "sample generations"},
        ),
    log:
        f"{R}/logs/manifest/{{experiment}}.log",
    conda:
        "../envs/model.yaml"
    params:
        settings=lambda w: stage_settings(w.experiment),
        code_version=CODE_VERSION,
        packages=PACKAGES,
        benchmarks=stage_benchmarks,
    script:
        "../scripts/manifest.py"


rule publish:
    """The shippable model: merged weights (hard links), a model card, the manifest."""
    input:
        merged=f"{R}/{{experiment}}/merged",
        manifest=f"{R}/{{experiment}}/manifest.json",
        code=code("publish"),
    output:
        model=directory(f"{R}/{{experiment}}/model"),
    log:
        f"{R}/logs/publish/{{experiment}}.log",
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/publish.py"


rule compare:
    """All experiments side by side: CSV, markdown and HTML tables, loss curves, metric bars."""
    input:
        manifests=expand(
            f"{R}/{{experiment}}/manifest.json", experiment=config["experiments"]
        ),
        logs=expand(
            f"{R}/{{experiment}}/train_log.jsonl", experiment=config["experiments"]
        ),
        code=code("compare"),
    output:
        csv=f"{R}/experiments.csv",
        md=f"{R}/experiments.md",
        html=report(
            f"{R}/experiments.html",
            caption="../report/experiments.rst",
            category="Comparison",
            labels={"view": "metrics table"},
        ),
        loss=report(
            f"{R}/plots/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Comparison",
            labels={"view": "loss curves"},
        ),
        metric=report(
            f"{R}/plots/main_metric.png",
            caption="../report/main_metric.rst",
            category="Comparison",
            labels={"view": "main metric"},
        ),
    log:
        f"{R}/logs/compare.log",
    conda:
        "../envs/data.yaml"
    params:
        experiments=list(config["experiments"]),
    script:
        "../scripts/compare.py"


rule data_report:
    """Rows per stage, rejected rows by reason, token lengths: one dataset's data stages."""
    input:
        shard_stats=shard_stats,
        dataset_stats=f"{R}/data/{{dataset}}/dataset_stats.json",
        tokenize_stats=dataset_tokenize_stats,
        code=code("data_report"),
    output:
        html=report(
            f"{R}/data/{{dataset}}/report/data_stats.html",
            caption="../report/data_stats.rst",
            category="Data",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "view": "rows and rejects"},
        ),
        lengths=report(
            f"{R}/data/{{dataset}}/report/token_lengths.png",
            caption="../report/token_lengths.rst",
            category="Data",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "view": "token lengths"},
        ),
    log:
        f"{R}/logs/data_report/{{dataset}}.log",
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/data_report.py"
