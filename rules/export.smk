# Deployment: the merged model as GGUF for llama.cpp / Ollama / LM Studio, verified against the
# merged model in llama.cpp itself, and an Ollama Modelfile. Evaluate scores each GGUF too.


# Writing a small text file: where Snakemake runs, never submitted to a cluster.
localrules:
    ollama_modelfile,


rule export_gguf:
    """The merged model as one GGUF type; metadata, token ids and log-probs checked in llama.cpp."""
    input:
        merged=rules.merge.output.merged,
        dataset=lambda w: L.dataset(task_dataset_of(w.experiment)),
        code=code("export_gguf"),
    output:
        gguf=L.gguf("{experiment}", "{qtype}"),
        report=L.gguf_report("{experiment}", "{qtype}"),
    log:
        L.log("export_gguf", "{experiment}-{qtype}"),
    benchmark:
        L.benchmark("export_gguf", "{experiment}-{qtype}")
    conda:
        "../envs/export.yaml"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        export=lambda w: EXPERIMENTS[w.experiment].export.to_dict(),
        # only what picks the evaluated prompts (their token ids are checked), so that a change
        # of another evaluate setting does not redo the export
        evaluate=lambda w: export_prompt_settings(w.experiment),
    script:
        "../scripts/export_gguf.py"


rule ollama_modelfile:
    """An Ollama Modelfile beside the GGUF: chat template, stop token, the task's system prompt."""
    input:
        gguf=lambda w: gguf_files(w.experiment)[0],
        merged=rules.merge.output.merged,
        dataset=lambda w: L.dataset(task_dataset_of(w.experiment)),
        code=code("ollama_modelfile"),
    output:
        L.experiment("{experiment}", "gguf/Modelfile"),
    log:
        L.log("ollama_modelfile", "{experiment}"),
    conda:
        "../envs/model.yaml"
    params:
        ollama=lambda w: EXPERIMENTS[w.experiment].export.ollama,
    script:
        "../scripts/ollama_modelfile.py"
