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
        dataset_stats=lambda w: L.dataset_stats(dataset_of(w.experiment)),
        tokenize_stats=lambda w: tokenize_stats_of(w.experiment),
        base=lambda w: L.base(model_of(w.experiment)),
        adapter=rules.train.output.adapter,
        merged=rules.merge.output.merged,
        metrics=rules.evaluate.output.metrics,
        samples=rules.evaluate.output.samples,
        summary=rules.train.output.summary,
        merge_report=rules.merge.output.report,
        shard_stats=lambda w: shard_stats_of_dataset(dataset_of(w.experiment)),
        gguf_reports=lambda w: gguf_reports(w.experiment),
        code=code("manifest"),
    output:
        manifest=L.manifest("{experiment}"),
        html=report(
            L.experiment("{experiment}", "manifest.html"),
            caption="../report/manifest.rst",
            category="Experiments",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "view": "manifest"},
        ),
        samples_html=report(
            L.experiment("{experiment}", "samples.html"),
            caption="../report/samples.rst",
            category="Experiments",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "view": "sample generations"},
        ),
    log:
        L.log("manifest", "{experiment}"),
    conda:
        "../envs/model.yaml"
    params:
        settings=lambda w: EXPERIMENTS[w.experiment].stage_settings(),
        code_version=CODE_VERSION,
        packages=PACKAGES,
        benchmarks=stage_benchmarks,
    script:
        "../scripts/manifest.py"


rule publish:
    """The shippable model: merged weights (hard links), a model card, the manifest."""
    input:
        merged=rules.merge.output.merged,
        manifest=rules.manifest.output.manifest,
        code=code("publish"),
    output:
        model=directory(L.experiment("{experiment}", "model")),
    log:
        L.log("publish", "{experiment}"),
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/publish.py"


rule compare:
    """All experiments side by side: CSV, markdown and HTML tables, loss curves, metric bars."""
    input:
        manifests=expand(rules.manifest.output.manifest, experiment=EXPERIMENTS),
        logs=expand(rules.train.output.steps, experiment=EXPERIMENTS),
        code=code("compare"),
    output:
        csv=L.run_file("experiments.csv"),
        md=L.run_file("experiments.md"),
        html=report(
            L.run_file("experiments.html"),
            caption="../report/experiments.rst",
            category="Comparison",
            labels={"view": "metrics table"},
        ),
        loss=report(
            L.run_file("plots/loss_curves.png"),
            caption="../report/loss_curves.rst",
            category="Comparison",
            labels={"view": "loss curves"},
        ),
        metric=report(
            L.run_file("plots/main_metric.png"),
            caption="../report/main_metric.rst",
            category="Comparison",
            labels={"view": "main metric"},
        ),
    log:
        L.run_file("logs/compare.log"),
    conda:
        "../envs/data.yaml"
    params:
        experiments=list(EXPERIMENTS),
    script:
        "../scripts/compare.py"


rule data_report:
    """Rows per stage, rejected rows by reason, token lengths: one dataset's data stages."""
    input:
        shard_stats=shard_stats,
        dataset_stats=rules.build_dataset.output.stats,
        tokenize_stats=dataset_tokenize_stats,
        code=code("data_report"),
    output:
        html=report(
            L.data_report("{dataset}", "data_stats.html"),
            caption="../report/data_stats.rst",
            category="Data",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "view": "rows and rejects"},
        ),
        lengths=report(
            L.data_report("{dataset}", "token_lengths.png"),
            caption="../report/token_lengths.rst",
            category="Data",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "view": "token lengths"},
        ),
    log:
        L.log("data_report", "{dataset}"),
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/data_report.py"
